"""uvicorn as `serve` runs it: connection limits and timeouts from Settings, and a log that stays
readable when the process runs out of file descriptors.

    config = uvicorn_config(app, settings, host="127.0.0.1", port=8080)
    uvicorn.Server(config).run()

* header timeout: a connection that has not sent a complete request line and headers within
  ``header_timeout`` seconds (after connecting, or after its previous response) is closed;
  uvicorn alone waits forever for a half-sent request (slowloris). So is one still sending the
  body of a request whose response is out (uvicorn stopped watching it at its first byte).
* send timeout: a client that reads nothing of its response for ``send_timeout`` seconds (its
  socket's buffers full) is dropped: it held its admission slot and the unsent bytes forever.
* ``max_connections``: the requests of a connection past it are marked (``OVER_CONNECTION_CAP``
  in the scope's state) and the app answers them 503 JSON with Retry-After and closes, except
  probes and scrapes (uvicorn's own ``limit_concurrency`` answered even /health a plain-text
  503, unseen by metrics and logs, and served one connection fewer than the cap).
* keep-alive and graceful-shutdown bounds (``keep_alive_timeout``, ``shutdown_timeout``).
* descriptor exhaustion (EMFILE/ENFILE) is logged once per interval, with a count, instead of
  once per failed accept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import struct
import time

try:  # Unix: a socket's kernel send queue is read too (TIOCOUTQ)
    import fcntl
    import termios
except ImportError:  # Windows
    fcntl = termios = None

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Settings

OVER_CONNECTION_CAP = "over_connection_cap"  # a scope state key: the connection is past the cap


def _marked_over_cap(app, connections: set, most: int):
    """``app`` for a connection opened past the cap: its requests are marked while the server
    still has more than ``most`` connections open (once others close, it is served)."""

    async def marked(scope, receive, send) -> None:
        if len(connections) > most:
            scope.setdefault("state", {})[OVER_CONNECTION_CAP] = True
        await app(scope, receive, send)

    return marked


RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RESOURCE_WORDS = ("too many open files", "out of system resource", "emfile", "enfile")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request line and headers."""

    header_timeout = 10.0  # set per server by protocol_class()
    send_timeout = 60.0
    max_connections: int | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_timer = self._send_timer = None
        self._send_left = 0  # bytes the transport held when the send timer was last started
        super().connection_made(transport)  # (counted in self.connections from here)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.app = _marked_over_cap(self.app, self.connections, self.max_connections)
        self._arm()

    def pause_writing(self) -> None:  # the client's buffers are full: it must read in time
        super().pause_writing()
        if self._send_timer is None:
            self._send_left = self._unsent()
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_stalled)

    def _unsent(self) -> int:
        """Bytes not yet taken by the client: the transport's and the kernel's send queue (Linux:
        TIOCOUTQ). Reading drains the kernel's first, the transport's only once it is half empty:
        a player reading at its own pace shows its progress there."""
        left = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and termios is not None and hasattr(termios, "TIOCOUTQ"):
            with contextlib.suppress(OSError, ValueError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                left += struct.unpack("i", queued)[0]
        return left

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_send_timer()

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_stalled(self) -> None:
        self._send_timer = None
        left = self._unsent()
        if left < self._send_left:  # it reads, slowly (a player at its own pace): watch on
            self._send_left = left
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_stalled)
            return
        # nothing read in send_timeout: abort, also when closing (close() waits for the
        # buffered bytes to be read: a whole response handed over, then the idle deadline's
        # close, kept 11 MB); the request's job is cancelled as for any client gone
        self.transport.abort()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if (self.conn.their_state is h11.IDLE or self._stale()) and not self.transport.is_closing():
            self.transport.close()  # nothing (or half a request) in time: free the descriptor

    def _stale(self) -> bool:
        """The response is out while the request's body is still coming: nothing reads it."""
        return self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (
            h11.DONE,
            h11.MUST_CLOSE,
        )

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and not self._stale():  # the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._stop_send_timer()
        super().connection_lost(exc)


def protocol_class(
    header_timeout: float,
    send_timeout: float = HeaderTimeoutProtocol.send_timeout,
    max_connections: int | None = None,
) -> type[HeaderTimeoutProtocol]:
    return type(
        "HeaderTimeoutProtocol",
        (HeaderTimeoutProtocol,),
        {
            "header_timeout": header_timeout,
            "send_timeout": send_timeout,
            "max_connections": max_connections,
        },
    )


class ResourceErrorThrottle(logging.Filter):
    """Lets one descriptor-exhaustion record through per ``interval`` seconds; the next one that
    passes says how many were dropped. Other records pass untouched."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.last = -float("inf")
        self.suppressed = 0

    @staticmethod
    def is_resource_error(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            return True
        text = record.getMessage().lower()
        return any(word in text for word in RESOURCE_WORDS)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.is_resource_error(record):
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return False
        self.last = now
        if self.suppressed:
            record.msg = f"{record.msg} ({self.suppressed} similar messages suppressed)"
            self.suppressed = 0
        record.exc_info = None  # the traceback says nothing more; keep the line short
        record.exc_text = None
        return True


def install_log_throttle(interval: float = 10.0) -> ResourceErrorThrottle:
    """Throttle descriptor-exhaustion records of asyncio (failed accepts) and uvicorn."""
    throttle = ResourceErrorThrottle(interval)
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, ResourceErrorThrottle)]:
            logger.removeFilter(old)
        logger.addFilter(throttle)
    return throttle


def uvicorn_config(app, settings: Settings, host: str, port: int, **extra) -> uvicorn.Config:
    """The uvicorn configuration for ``settings`` (see module doc)."""
    install_log_throttle()
    options = {
        "host": host,
        "port": port,
        "http": protocol_class(
            settings.header_timeout, settings.send_timeout, settings.max_connections
        ),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "log_config": None,
        "access_log": False,
        **extra,
    }
    return uvicorn.Config(app, **options)
