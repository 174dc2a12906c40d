"""Handing freed heap back to the OS (heap.py)."""

from __future__ import annotations

import gc

from cosyvoice_lite.heap import release_freed_memory


def test_handing_memory_back_leaves_nothing_for_the_garbage_collector() -> None:
    """It runs after every streamed flow call: each call must free all it makes by reference
    counting (a C library loaded per call left objects in cycles every time)."""
    release_freed_memory()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            release_freed_memory()
        gc.collect()
        left = [o for o in gc.garbage if type(o).__module__ in ("ctypes", "_ctypes")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
