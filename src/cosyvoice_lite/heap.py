"""Handing freed heap back to the operating system.

glibc's allocator keeps the memory that freed tensors below its mmap threshold leave behind
(up to 32 MB each, so most activations and cache blocks): a process's resident size stays at its
peak after loading or after a long stream, although nothing uses that memory any more.
``malloc_trim`` returns the whole free pages of its arenas. It costs tens of milliseconds for
gigabytes and makes the next allocations fault their pages in again, so it runs after loading,
when the engine has been idle for a while, and on a CPU after each streaming flow call: the
transients of a stream's chunk calls (~3 GB allocated and freed per call of a long CosyVoice2
stream, never more than a few MB at once) land on free chunks all over the heap, so that its
free pages became resident one call after another, ~0.6 GB past what the stream held (a 15 s
float32 CosyVoice2 stream peaked 4,643 MiB above its voice, 3,971 trimmed after each call, in
1.02x the time; benchmarks/README.md). Never between the LLM's steps.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (a ``ctypes.CDLL`` per call left a few objects in
    reference cycles for the garbage collector each time); None on other C libraries."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the allocator's free pages to the OS (glibc's ``malloc_trim``; nothing on other C
    libraries). Measured with full-size CosyVoice2: 2.0 -> 1.5 GB resident after loading in bf16,
    3.0 -> 1.5 GB with int8 LLM layers, 5.7 -> 4.5 GB after a float32 stream."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
