"""onnxruntime's CPU threads: a pool per session (onnxruntime's default), or one pool that every
session of the process shares.

The int8 LLM runs each linear layer as its own small onnxruntime session (quantized_linear.py):
~60 (CosyVoice-300M) to ~100 (CosyVoice2) calls a decoding step of 0.1-0.3 ms each. With a pool
per session, a call has to wake its session's sleeping worker thread first (those workers must
not spin: ~100 spinning pools fight over the cores), ~0.1 ms a call on a 2-core VM. One shared
pool has one worker for every session, which spins between a step's calls and sleeps ~25 ms after
the last: a full-size CosyVoice-300M int8 step 24.0 -> 20.8 ms and whole requests 1.16x the audio
per second, a CosyVoice2 step 37.4 -> 28.9 ms and streams 1.15x (benchmarks/README.md,
``bench_onnx_pool.py``, 2026-12-06). The speech tokenizer's and speaker encoder's sessions then
run on that pool too (on one thread of their own otherwise, as the official's), the same floats.

onnxruntime makes the shared pool a property of the process: once it exists, every session the
process creates must use it (onnxruntime refuses a session that asks for its own pool). So the
processes this project owns (the CLI, the server, a Ray replica, the benchmarks) call
``share_threads`` once, before loading; a library user may do the same in their own process.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_shared: int | None = None  # the shared pool's threads, once there is one


def share_threads(threads: int) -> int:
    """Give the process one onnxruntime pool of ``threads`` threads (the caller's included) for
    every session created from now on; the first call decides, later calls keep that pool.
    Returns the pool's size (0 where another part of the process made it: unknown)."""
    global _shared
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    import onnxruntime as ort

    with _lock:
        if _shared is None:
            try:
                ort.set_global_thread_pool_sizes(threads, 1)
                _shared = threads
            except Exception as err:  # onnxruntime's own exception type
                if "already been created" not in str(err):
                    raise
                _shared = 0  # made before us; sessions must use it all the same
        return _shared


def shared_threads() -> int | None:
    """The shared pool's size, 0 if unknown, None while sessions have pools of their own."""
    return _shared


def session_options(threads: int) -> Any:  # onnxruntime.SessionOptions
    """Options for a CPU session computing with ``threads`` threads: a pool of its own of that
    size, or the process's shared pool where ``share_threads`` made one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if _shared is None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    else:  # thread counts set here would be ignored, with a warning on stderr
        options.use_per_session_threads = False
    return options
