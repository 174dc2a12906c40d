"""Responses are encoded off the engine loop.

The engine loop hands each request's audio to the server from the thread that steps every row;
encoding it there (Opus: ~25 ms per second of audio on one core, mp3 ~8 ms) stopped all the other
rows meanwhile, and on a GPU, where a batch makes 25 seconds of audio per second, it would cost
as much as the synthesis. Each request's pieces are encoded in order on a small shared pool: a
``Strand`` runs one request's tasks one at a time, in the order given, on whichever pool thread
is free.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("cosyvoice_lite.server")

ENCODING_THREADS = 2
"""Requests encoded at once: encoding is a few percent of a CPU's synthesis time, and more
threads would take cores from the engine's."""


class Strand:
    """Runs its tasks one at a time, in submission order, on a shared pool."""

    def __init__(self, pool: EncodingPool) -> None:
        self._pool = pool
        self._tasks: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            self._tasks.append(task)
            if self._running:  # the running drain takes it next
                return
            self._running = True
        self._pool.run(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    self._running = False
                    return
                task = self._tasks.popleft()
            try:
                task()
            except Exception:  # a task reports its own errors; this one did not
                log.exception("an encoding task failed")


class EncodingPool:
    """The server's encoding threads; ``strand()`` gives a request its own ordered queue."""

    def __init__(self, threads: int = ENCODING_THREADS) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cosyvoice-encode")
        self._closed = False

    def strand(self) -> Strand:
        return Strand(self)

    def run(self, drain: Callable[[], None]) -> None:
        if not self._closed:
            try:
                self._executor.submit(drain)
                return
            except RuntimeError:  # shut down meanwhile
                pass
        drain()  # after shutdown: on the caller's thread, so that no request is left unended

    def shutdown(self) -> None:
        """Stop taking work; what is queued still runs."""
        self._closed = True
        self._executor.shutdown(wait=False)
