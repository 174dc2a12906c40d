"""A value read from slow storage, kept and read again in the background: the probes and gauges
of /ready and /metrics must answer while a voice bucket hangs (docs/OPERATIONS.md)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Refreshed(Generic[T]):
    """The latest value of ``read``, read again on a thread of its own once it is ``interval``
    seconds old, one read at a time. Callers wait for a read under way until it is ``wait``
    seconds old (a storage that answers gives fresh values), then get the value before it."""

    def __init__(
        self, read: Callable[[], T], initial: T, interval: float, wait: float, what: str
    ) -> None:
        self._read, self._interval, self._wait, self._what = read, interval, wait, what
        self._lock = threading.Lock()
        self._value, self._read_at = initial, -float("inf")
        self._reading: threading.Event | None = None
        self._started = 0.0
        self._expired = 0  # expire() calls: a read begun before one is not fresh when it ends

    def get(self) -> tuple[T, float | None]:
        """(the latest value, for how many seconds a read has been waiting on the storage, or
        None when none is)."""
        with self._lock:
            now = time.monotonic()
            if self._reading is None and now - self._read_at >= self._interval:
                self._reading, self._started = threading.Event(), now
                args = (self._reading, self._expired)
                threading.Thread(
                    target=self._refresh, args=args, name="cosyvoice-refresh", daemon=True
                ).start()
            reading, left = self._reading, self._started + self._wait - now
        if reading is not None and left > 0:  # up to ``wait`` after the read began, in all
            reading.wait(left)
        with self._lock:
            waiting = None if self._reading is None else time.monotonic() - self._started
            return self._value, waiting

    def expire(self) -> None:
        """Read again at the next ``get`` (this process changed what is read)."""
        with self._lock:
            self._read_at = -float("inf")
            self._expired += 1

    def _refresh(self, done: threading.Event, expired: int) -> None:
        value, read = None, False
        try:
            value, read = self._read(), True
        except Exception as exc:  # noqa: BLE001 - the last value stays; the next get reads again
            log.warning("cannot read %s: %s", self._what, exc)
        finally:
            with self._lock:
                if read:
                    self._value = value
                    if expired == self._expired:
                        self._read_at = time.monotonic()
                self._reading = None
            done.set()
