"""Admission control between the HTTP handlers and the engine loop.

The engine loop computes every admitted request together (see ``cosyvoice_lite.engine_loop``);
there is no thread per request. A request is admitted only if fewer than ``slots + max_queue`` are
in flight (``slots``: rows the engine steps together); beyond that the caller gets
:class:`Overloaded` (HTTP 429 with Retry-After). A :class:`Job` is the event-loop side of one
request: the engine loop thread hands it pieces with :meth:`Job.put` and ends it with
:meth:`Job.finish`; cancelling it (client gone, timeout) removes the request's row from the engine
at its next step.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Overloaded(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    """The job ran past its deadline."""


_DONE = object()


class Job:
    """One request's output as the event loop reads it (:meth:`next`), fed from any thread."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadline: float, held_until_read: bool = False
    ) -> None:
        """``held_until_read``: the admission slot is released once the output is also read
        (or its reader gone: :meth:`cancel`), not when it is all made. A streamed response's
        output waits here for its client, so a client that reads slowly, or not at all, holds
        its slot meanwhile: the output kept for clients is at most one request's per slot."""
        self.loop = loop
        self.deadline = deadline  # time.monotonic() value
        self._held = held_until_read
        self._reader_gone = False
        self._released = False
        self._release_lock = threading.Lock()
        self.cancelled = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started_at: float | None = None
        self.ended = False  # the reader has seen the end (or the error) of the output
        self._on_cancel: list[Callable[[], None]] = []
        self._on_finish: list[Callable[[], None]] = []
        self._finished = threading.Event()
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None

    # -- producer side (engine loop thread, or any thread)
    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody will read this
            self.cancel()

    def finish(self, error: BaseException | None = None) -> None:
        """The end of the output (or its error); releases the request's admission slot."""
        if self._finished.is_set():
            return
        self._finished.set()
        self.put(_DONE if error is None else error)
        self._release_when_done()

    def _release_when_done(self) -> None:
        """Release the admission slot once the output is made and, if held, read or abandoned."""
        with self._release_lock:
            if self._released or not self._finished.is_set():
                return
            if self._held and not (self._reader_gone or self.ended):
                return
            self._released = True
        for callback in self._on_finish:
            callback()

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def stop_requested(self) -> bool:
        return self.cancelled.is_set() or self.expired()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the job is cancelled (at once if it already is)."""
        self._on_cancel.append(callback)
        if self.cancelled.is_set():
            callback()

    # -- event-loop side
    def stop_at_deadline(self) -> None:
        """Stop the work at the deadline, not when the reader next asks for a piece: a client
        reading slowly, but never so slowly that a send times out, had the engine compute its
        whole request past the limit, the unread audio piling up here."""
        self._timer = self.loop.call_later(max(self.deadline - time.monotonic(), 0.0), self._expire)

    def _expire(self) -> None:
        if not self._finished.is_set():
            self.timed_out = True
            self.cancel()

    def cancel(self) -> None:
        """Stop the request: its client is gone, or the response is over (nothing more is read)."""
        if self._timer is not None:
            self._timer.cancel()  # (its callback held the job until the deadline)
        self._reader_gone = True
        self._release_when_done()
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        for callback in self._on_cancel:
            callback()

    async def next(self) -> Any:
        """The next piece; raises StopAsyncIteration at the end, JobTimeout past the deadline, or
        the exception the producer raised. Output made in time is read to its end; past the
        deadline, unfinished work is stopped and what it left here is not sent."""
        if self.timed_out or (self.expired() and not self._finished.is_set()):
            raise self._time_out()
        remaining = self.deadline - time.monotonic()
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise self._time_out() from None
        if self.timed_out:  # the timer stopped the work meanwhile: what ended it is not the end
            raise self._time_out()
        if item is _DONE or isinstance(item, BaseException):
            self.ended = True
            self._release_when_done()
            if self._timer is not None:
                self._timer.cancel()
            if item is _DONE:
                raise StopAsyncIteration
            raise item
        return item

    def _time_out(self) -> JobTimeout:
        self.cancel()  # (a caller may still extend the deadline and read on: voice_create)
        return JobTimeout()

    def __aiter__(self) -> Job:
        return self

    async def __anext__(self) -> Any:
        return await self.next()


class Scheduler:
    """Admission control in front of the engine loop."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.in_flight = 0  # admitted and not finished
        self._recent: list[float] = []  # durations of the last jobs, for Retry-After
        self.runner: Callable[[Callable[[], Any]], Future] | None = None  # engine.call, once loaded

    @property
    def capacity(self) -> int:
        return self.slots + self.max_queue

    @property
    def queued(self) -> int:
        return max(self.in_flight - self.slots, 0)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: typical job time x queue length / slots."""
        with self._lock:
            typical = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
            waiting = self.in_flight - self.slots + 1
        return max(1, math.ceil(typical * max(waiting, 1) / self.slots))

    def submit(self, job: Job, start: Callable[[Job], None]) -> None:
        """Admit ``job`` (or raise :class:`Overloaded`) and ``start`` it; ``start`` hands the work
        to the engine, which ends the job with :meth:`Job.finish`."""
        self._admit(job)
        try:
            start(job)
        except BaseException as exc:  # noqa: BLE001 - e.g. a request the engine refuses
            job.finish(exc)

    def call(
        self,
        job: Job,
        fn: Callable[[], Any],
        runner: Callable[[Callable[[], Any]], Future] | None = None,
    ) -> None:
        """Run one function as an admitted job: in the engine loop (e.g. computing a voice's
        features), or with ``runner`` (e.g. on a thread of its own, for work that mostly waits
        on storage and sends its model work to the engine loop itself)."""
        runner = runner or self.runner
        if runner is None:
            raise RuntimeError("the engine is not loaded")
        self._admit(job)

        def done(future: Future) -> None:
            error = future.exception()
            if error is None:
                job.put(future.result())
            job.finish(error)

        try:
            runner(fn).add_done_callback(done)
        except BaseException as exc:  # noqa: BLE001 - the engine is closing
            job.finish(exc)

    def _admit(self, job: Job) -> None:
        with self._lock:
            admitted = self.in_flight < self.capacity
            if admitted:
                self.in_flight += 1
        if not admitted:
            raise Overloaded(self.retry_after())
        job.started_at = time.monotonic()
        job._on_finish.append(lambda: self._release(job))

    def _release(self, job: Job) -> None:
        with self._lock:
            self.in_flight -= 1
            self._recent = (self._recent + [time.monotonic() - job.started_at])[-20:]

    def shutdown(self) -> None:
        """Nothing to stop here: the engine loop belongs to the engine (``Engine.close``)."""
