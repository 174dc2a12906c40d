"""Synthesis off the event loop: a fixed pool of worker threads behind a bounded queue.

A request is admitted only if fewer than ``workers + max_queue`` requests are in flight; beyond
that the caller gets :class:`Overloaded` (HTTP 429 with Retry-After). Each admitted job runs
entirely in a worker thread and hands its output to the event loop piece by piece; cancelling a
job (client gone, timeout) makes the worker close the engine iterator at its next chunk, which
stops the synthesis and drops its tensors.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Overloaded(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    """The job ran past its deadline."""


_DONE = object()


class Job:
    """One request's work: ``produce`` yields pieces in a worker thread; the event loop reads them
    with :meth:`next`. ``produce`` gets the job, to check :attr:`cancelled` between pieces."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.loop = loop
        self.deadline = deadline  # time.monotonic() value
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started_at: float | None = None
        self.ended = False  # the reader has seen the end (or the error) of the output

    # -- worker side
    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody will read this
            self.cancelled.set()

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def stop_requested(self) -> bool:
        return self.cancelled.is_set() or self.expired()

    def run(self, produce: Callable[[Job], Iterator[Any]]) -> None:
        self.started_at = time.monotonic()
        try:
            if self.stop_requested():
                return
            pieces = produce(self)
            try:
                for piece in pieces:
                    self.put(piece)
                    if self.stop_requested():
                        return
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # stops the engine generator and frees its state now
            self.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which reports it
            self.put(exc)

    # -- event-loop side
    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> Any:
        """The next piece; raises StopAsyncIteration at the end, JobTimeout past the deadline, or
        the exception the worker raised."""
        remaining = self.deadline - time.monotonic()
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.cancel()
            raise JobTimeout() from None
        if item is _DONE:
            self.ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        return item

    def __aiter__(self) -> Job:
        return self

    async def __anext__(self) -> Any:
        return await self.next()


class Scheduler:
    """Admission control plus the worker pool."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.workers = workers
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synthesis")
        self._lock = threading.Lock()
        self.in_flight = 0  # admitted and not finished
        self.running = 0  # in a worker right now
        self._recent: list[float] = []  # durations of the last jobs, for Retry-After

    @property
    def capacity(self) -> int:
        return self.workers + self.max_queue

    @property
    def queued(self) -> int:
        return max(self.in_flight - self.running, 0)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: typical job time x queue length / workers."""
        with self._lock:
            typical = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
            waiting = self.in_flight - self.workers + 1
        return max(1, math.ceil(typical * max(waiting, 1) / self.workers))

    def submit(self, job: Job, produce: Callable[[Job], Iterator[Any]]) -> None:
        """Admit ``job`` or raise :class:`Overloaded`."""
        with self._lock:
            admitted = self.in_flight < self.capacity
            if admitted:
                self.in_flight += 1
        if not admitted:
            raise Overloaded(self.retry_after())
        self._pool.submit(self._run, job, produce)

    def call(self, job: Job, fn: Callable[[], Any]) -> None:
        """Run a single function as a job (e.g. computing a voice's features)."""

        def produce(_: Job) -> Iterator[Any]:
            yield fn()

        self.submit(job, produce)

    def _run(self, job: Job, produce: Callable[[Job], Iterator[Any]]) -> None:
        with self._lock:
            self.running += 1
        start = time.monotonic()
        try:
            job.run(produce)
        finally:
            with self._lock:
                self.running -= 1
                self.in_flight -= 1
                self._recent = (self._recent + [time.monotonic() - start])[-20:]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
