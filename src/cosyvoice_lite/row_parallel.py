"""A batch's rows computed on several CPU threads at once, each with one torch thread.

Why: the flows' operations are small on a CPU (a streamed chunk is 50 frames), and under the
passive OpenMP wait policy that the CLI and the server use, every parallel operation pays the
wake-up of its sleeping OpenMP threads (~100 us on the development VM: a 51k-element add took
102 us on 2 threads against 7 us on one). A streamed CosyVoice2 chunk took 2.7-3.1 s on 2 torch
threads and 2.2-3.2 s on one. The rows of an estimator call (a stream's conditional and
unconditional rows, or several streams) are independent, so k threads computing a share of the
rows each, with one torch thread each, use k cores with no OpenMP wake-up at all: 1.7-2.0 s
(benchmarks/README.md, "Flow rows on threads").

The rows run on ``threads`` helper threads owned here, while the caller waits, so the caller
keeps its own torch threads for its other work. A row's result must be the same whatever rows it
is computed with, so that streams computed together still equal each alone: either each row is
computed alone, in one shape (torch's default float32 matrix products can round differently for
another number of rows), or, where every operation is known to compute a row alike in any batch
(``shares``), each thread takes one contiguous share of the rows in one call: fewer, larger
operations, the streams' chunks batched for real (eight CosyVoice2 bfloat16 streams' chunks 1.7x
faster than rows alone, bit-identical; benchmarks/README.md). Each row must touch only its own
state: the incremental flows keep one cache per row for that reason.

A thread can narrow its own small calls (``at_most``): the engine's audio workers compute a lone
stream's chunk on one helper thread while the LLM decodes beside it, so that the two do not share
both cores four ways (measured at ``at_most``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")


def start_torch_thread(
    target: Callable[[], object], threads: int, name: str, process_threads: int | None = None
) -> threading.Thread:
    """Start a daemon thread running ``target`` with ``threads`` torch threads of its own; return
    once it has them (``set_own_threads``: the count threads starting later take stays the
    process's; where only ``torch.set_num_threads`` is at hand, the process's count,
    ``process_threads``, default the caller's, is set again here)."""
    process_threads = process_threads or torch.get_num_threads()
    ready = threading.Event()

    def run() -> None:
        set_own_threads(threads)
        ready.set()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if _own_count_setters() is None:
        torch.set_num_threads(process_threads)
    return thread


@functools.cache
def _own_count_setters() -> tuple[Callable[[int], object], ...] | None:
    """The runtimes' setters of the calling thread's count that ``torch.set_num_threads`` calls
    (GNU OpenMP's ``omp_set_num_threads``, MKL's ``mkl_set_num_threads_local``), where both are
    found in this process and move torch's count; None elsewhere (Windows, macOS)."""
    try:
        process = ctypes.CDLL(None)
        library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        omp = process.omp_set_num_threads
        setters = [omp]
        if torch.backends.mkl.is_available():
            # (the C call: mkl.h maps mkl_set_num_threads_local to it; the lower-case symbol is
            # the Fortran one, which takes a pointer)
            setters.append(ctypes.CDLL(library).MKL_Set_Num_Threads_Local)
    except (OSError, AttributeError, TypeError):
        return None
    for setter in setters:
        setter.argtypes, setter.restype = [ctypes.c_int], None
    return tuple(setters) if _moves_torch(setters) else None


def _moves_torch(setters: list[Callable[[int], object]]) -> bool:
    """Whether the setters found change the count torch reads: the first omp_set_num_threads in
    the process may be another library's OpenMP (a system libgomp loaded by another package),
    which would leave torch's alone. Tried on a scratch thread."""
    seen: list[int] = []

    def trial() -> None:
        wanted = 2 if torch.get_num_threads() == 1 else 1
        for setter in setters:
            setter(wanted)
        seen.extend((wanted, torch.get_num_threads()))

    thread = threading.Thread(target=trial, name="thread-count-trial")
    thread.start()
    thread.join()
    return len(seen) == 2 and seen[0] == seen[1]


def set_own_threads(threads: int) -> None:
    """The calling thread's torch threads (its OpenMP team, MKL's), leaving alone the count that
    threads starting later take. ``torch.set_num_threads`` sets that one too: switched for each
    product of a decoding step, it gave whatever thread started meanwhile one thread for its
    life (a second engine loaded then, a program's own pool). Where the runtimes' setters are
    not found, ``torch.set_num_threads``."""
    torch.get_num_threads()  # this thread's own set-up first: it would apply the process's count
    _set_own(threads)


def _set_own(threads: int) -> None:
    """``set_own_threads`` in a thread whose torch set-up has run."""
    setters = _own_count_setters()
    if setters is None:
        torch.set_num_threads(threads)
        return
    for setter in setters:
        setter(threads)


def call_on_threads(threads: int | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with the calling thread's torch threads set to ``threads`` for the call
    (its OpenMP team), then set back; None or the caller's count: called as it is. An LLM's
    decoding thread runs on one torch thread and gives its weight-reading products (and its
    captured steps) the process's threads this way (``precision.PackedLinear``,
    ``graph_capture.CapturedGraphs.run``)."""
    caller = torch.get_num_threads()
    if threads is None or threads == caller:
        return fn(*args)
    _set_own(threads)
    try:
        return fn(*args)
    finally:
        _set_own(caller)


_CALLER = threading.local()  # .cap: the calling thread's (threads, while) from at_most


@contextmanager
def at_most(threads: int, while_: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Within it, the calling thread's ``RowSplit.map`` calls of fewer than two rows per helper
    (on 2 threads: one stream's two CFG rows) use at most ``threads`` helpers, each call that
    starts while ``while_()`` holds (a flow call makes one per Euler step, so it can widen
    half-way). Each helper still has one torch thread. Only for calls whose rows compute alike in
    any share (the incremental streams'): their floats then do not change. Why: beside the LLM
    decoding on the same 2 cores, a stream's chunk took 1.4-1.5 s with a row on each of two
    helpers and 1.07-1.19 s as one share on one, and decoding slowed less (CosyVoice2 bfloat16;
    benchmarks/README.md, "A stream's flow calls on one thread while the LLM decodes"); calls
    of two rows or more per helper are batched products, which keep every helper."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = getattr(_CALLER, "cap", None)
    _CALLER.cap = (threads, while_)
    try:
        yield
    finally:
        _CALLER.cap = before


def _width(threads: int, rows: int) -> int:
    """The helpers a ``map`` call of ``rows`` rows from the calling thread uses now
    (``at_most``)."""
    cap = getattr(_CALLER, "cap", None)
    if cap is None or rows >= 2 * threads or not cap[1]():
        return threads
    return min(threads, cap[0])


class RowSplit:
    """Runs ``fn(rows)`` on ``threads`` threads over the rows of a batch and concatenates the
    results along dim 0 in row order. By default each row is computed alone (``rows`` a one-row
    slice), in one shape, so a row's result never depends on which rows it was computed with.
    With ``shares``, each thread gets one contiguous share of the rows in a single call instead:
    for networks whose every operation computes a row the same whatever rows share the call
    (oneDNN's packed products past one row, per-row int8 scales, per-row attention and caches,
    ``flow_matching.conv1d_by_row``), not torch's default float32 products. ``RowSplit(1)``
    (``SERIAL``) calls ``fn`` once with every row, on the caller's thread. Under ``at_most(k)``
    the rows of a small call (alone or in shares) go to k helpers only, each computing its
    slices in order."""

    def __init__(self, threads: int, shares: bool = False) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads, self.shares = threads, shares
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []
        if threads == 1:
            return
        self._helpers = [
            start_torch_thread(self._serve, 1, f"cosyvoice-rows-{index}")
            for index in range(threads)
        ]

    def _serve(self) -> None:
        while (work := self._queue.get()) is not None:
            fn, rows, future = work
            try:
                future.set_result(fn(rows))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
            # an idle helper holds nothing of its last call: ``fn`` reaches the caller's state
            # (a finished stream's flow caches, ~1 GB for CosyVoice2 in float32)
            del work, fn, rows, future

    def map(self, fn: Callable[[slice], torch.Tensor], rows: int) -> torch.Tensor:
        if not self._helpers:
            return fn(slice(0, rows))
        # grad and inference modes are per thread: the helpers take the caller's
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def share(rows: slice) -> torch.Tensor:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(rows)

        def shares_of(parts: list[slice]) -> list[torch.Tensor]:
            return [share(part) for part in parts]

        width = _width(self.threads, rows)
        parts = self._parts(rows, width)
        # narrowed: ``width`` helpers, each its group in order; else each part for the first free
        groups = [[part] for part in parts] if width == self.threads else _groups(parts, width)
        futures: list[Future] = []
        for group in groups:
            futures.append(Future())
            self._queue.put((shares_of, group, futures[-1]))
        wait(futures)  # every group done (or failed) before any result or error is used
        return torch.cat([out for future in futures for out in future.result()], dim=0)

    def _parts(self, rows: int, width: int) -> list[slice]:
        """The slices computed apart: each row alone, or ``width`` contiguous shares."""
        if not self.shares:
            return [slice(row, row + 1) for row in range(rows)]
        return [slice(a, b) for a, b in _bounds(rows, width)]

    def close(self) -> None:
        """Stop the helper threads once their work is done and wait for them to end (a later
        `map` computes serially). Waiting matters: a helper that had run torch operations and is
        still ending while the interpreter exits aborts the process (exit status 134, seen in
        about a third of runs of a script that closed an engine and returned)."""
        helpers, self._helpers = self._helpers, []
        for _ in helpers:
            self._queue.put(None)
        for helper in helpers:
            if helper is not threading.current_thread():
                helper.join()


def _bounds(items: int, count: int) -> list[tuple[int, int]]:
    """``items`` cut into ``count`` (at most ``items``, at least 1) contiguous near-equal runs."""
    count = max(min(count, items), 1)
    bounds = [items * index // count for index in range(count + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def _groups(parts: list[slice], width: int) -> list[list[slice]]:
    """``parts`` in ``width`` contiguous groups, one per helper of a narrowed call."""
    return [parts[a:b] for a, b in _bounds(len(parts), width)]


SERIAL = RowSplit(1)
