"""Per-request bounds that hold whatever the route: body size and body read time (enforced while
the body is read, chunked bodies included), text fields, security headers, and streamed responses
that cannot finish (aborted, never ended as if complete).

    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    check_texts(settings, text=body.text, instruct=body.instruct)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import sys

from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError, ClientGone
from .metrics import Metrics
from .settings import Settings
from .streaming import StreamTruncated, sse_event

log = logging.getLogger("cosyvoice_lite.serving")

FORM_OVERHEAD = 64 * 1024  # multipart framing and the small text fields around the audio files
# the most audio files one form carries (voice conversion: source_wav and prompt_wav), each at
# most --max-upload-mb; every route checks its own files' count and sizes as it reads them
FORM_FILES = 2
MAX_NAME_FIELD_CHARS = 256  # voice, speaker, model, name: identifiers, never long

# The page loads only its own files; audio plays from blob: URLs made from fetched responses.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob: data:; connect-src 'self'; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOC_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


# ------------------------------------------------------------------------------------ text


def _field_limit(settings: Settings, field: str) -> int:
    if field in ("text", "input"):
        return settings.max_text_chars
    if field in ("instruct", "instructions"):
        return settings.max_instruct_chars
    if field in ("prompt_text", "transcript"):
        return settings.max_prompt_text_chars
    return MAX_NAME_FIELD_CHARS


def check_text(field: str, value: str | None, limit: int, kind: str | None = None) -> None:
    """400 naming ``field`` if ``value`` is not valid Unicode text or longer than ``limit``;
    ``kind``: what the field holds where its name does not say (a transcript sent as ``text``),
    which names the error code."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ApiError(400, f"{field} must be text", code="invalid_text", param=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone UTF-16 surrogates (JSON "\ud800") are not text
        raise ApiError(
            400,
            f"{field} is not valid Unicode text: a lone surrogate at character {exc.start}",
            code="invalid_text",
            param=field,
        ) from None
    if len(value) > limit:
        # "text_too_long" for the text itself, as before; "<field>_too_long" for the others
        kind = kind or field
        code = "text_too_long" if kind in ("text", "input") else f"{kind}_too_long"
        raise ApiError(
            400,
            f"{field} is too long: {len(value)} characters, the limit is {limit}",
            code=code,
            param=field,
            max_chars=limit,
        )


def check_texts(settings: Settings, **fields: str | None) -> None:
    """Check every text field of a request against its configured limit (see Settings)."""
    for field, value in fields.items():
        check_text(field, value, _field_limit(settings, field))


def _surrogate_path(value, path: str = "") -> str | None:
    """Where in a parsed JSON value a string (or key) holds a lone surrogate, or None. Walked
    with a stack of its own: a body may nest as deep as the JSON parser allows."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                stack.append((child, f"{where}.{key}" if where else str(key)))
                stack.append((key, where or "body"))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None


TOO_DEEP = "the body's JSON is nested too deeply to read"
# a JSON escape of a UTF-16 surrogate: only such escapes can smuggle lone surrogates into text
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def unreadable_json(body: bytes) -> str | None:
    """Why a JSON body cannot be read, for what the route's own parser only reports as "error
    parsing the body": bytes that are not UTF-8, a number too long to convert. (Malformed JSON
    is left to the route, which names where.)"""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the body is not UTF-8 text (byte {exc.start}); send JSON in UTF-8"
    limit = sys.get_int_max_str_digits()
    # a run longer than the limit, tried only at the start of each run (linear in the body)
    if not limit or not re.search(rb"(?<!\d)\d{%d}" % (limit + 1), body):
        return None
    try:
        json.loads(body)
    except RecursionError:
        return TOO_DEEP
    except ValueError as exc:
        if "digits" in str(exc):  # Python's limit on the digits of an int it converts
            return "the body has a number with too many digits"
    return None


STRUCTURE_ROOM = 65_536
"""Objects, arrays and items a JSON body may open beyond what its texts may hold: a body of
millions of empty objects within --max-json-mb parsed to ~23x its size (310 MB a request)."""


def json_structure_limit(settings: Settings) -> int:
    """``{``, ``[`` and ``,`` a JSON body may hold: every character of its longest texts may be
    one (text is not told apart from structure: counting is one pass in C), and the room."""
    texts = settings.max_text_chars + settings.max_instruct_chars + settings.max_prompt_text_chars
    return STRUCTURE_ROOM + texts


def too_much_structure(body: bytes, limit: int) -> str | None:
    """Why a JSON body is refused before it is parsed for its size once parsed, or None."""
    count = body.count(b"{") + body.count(b"[") + body.count(b",")
    if count <= limit:
        return None
    return (
        f"the body opens {count} JSON objects, arrays or items, at most {limit} are read; "
        "send the fields the route takes"
    )


def lone_surrogate_field(body: bytes) -> str | None:
    """The field of a JSON body whose text contains a lone UTF-16 surrogate (JSON ``"\\ud800"``
    decodes to a str that no encoder accepts), or None."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        return _surrogate_path(json.loads(body))
    except (ValueError, RecursionError):
        return None  # not JSON, or nested too deeply to read: the route reports that


# ------------------------------------------------------------------------------------ bodies


# Set (in the request's task) when the guard ends a stream without its last chunk on purpose:
# uvicorn then logs "ASGI callable returned without completing response." at ERROR level, with
# no request id, after the guard's own warning; alerts on errors fired for every timeout.
CUT_ON_PURPOSE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cut_on_purpose", default=False
)
INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."


class CutStreamFilter(logging.Filter):
    """Drops uvicorn's error line for a stream the guard cut on purpose (logged already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (CUT_ON_PURPOSE.get() and record.getMessage() == INCOMPLETE_RESPONSE)


def quiet_cut_streams() -> None:
    """Install ``CutStreamFilter`` on uvicorn's error logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, CutStreamFilter) for f in logger.filters):
        logger.addFilter(CutStreamFilter())


class BodyRejected(StarletteHTTPException):
    """Raised inside ``receive`` to stop whoever reads the body; the middleware answers."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.status, error.message)
        self.error = error


def body_limit(settings: Settings, content_type: str) -> int:
    if content_type.startswith("multipart/form-data"):
        return FORM_FILES * settings.max_upload_bytes + FORM_OVERHEAD
    return settings.max_json_bytes


def _too_large(limit: int, upload: bool, length: int | None = None) -> ApiError:
    size = f"{length} bytes" if length is not None else f"more than {limit} bytes"
    return ApiError(
        413,
        f"request body too large: {size}, at most {limit} bytes",
        code="upload_too_large" if upload else "body_too_large",
        max_bytes=limit,
    )


def app_path(scope) -> str:  # noqa: ANN001 - an ASGI scope
    """The request's path within the app: ASGI servers (uvicorn, Ray Serve under a route
    prefix) include the ``root_path`` the app is mounted at in ``path``."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class GuardMiddleware:
    """Body size and read-time limits, security headers, and truncated streams (see module doc)."""

    def __init__(self, app, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    def _headers(self, path: str, headers: list) -> list:
        present = {k.lower() for k, _ in headers}
        if b"cache-control" not in present and (
            path in ("/", "/favicon.ico") or path.startswith("/static/")
        ):
            # the page's files are asked for again each time (a 304 from their ETag): cached
            # heuristically, a browser ran an upgraded server's old app.js for days
            headers = [*headers, (b"cache-control", b"no-cache")]
        if not self.settings.security_headers:
            return headers
        out = list(headers) + [h for h in SECURITY_HEADERS if h[0] not in present]
        content_type = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
        if content_type.startswith(b"text/html") and not path.startswith(DOC_PATHS):
            out.append((b"content-security-policy", PAGE_CSP.encode()))
        return out

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # HEAD is GET without the body wherever GET is served (RFC 9110; uptime checks and load
        # balancers probe with it): FastAPI's GET routes answer it 405 on their own
        head = scope["method"] == "HEAD"
        # read now: routing changes the scope (a Mount moves /static into its root_path)
        path = app_path(scope)
        if head:
            scope = {**scope, "method": "GET"}
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        limit = body_limit(self.settings, content_type)
        upload = content_type.startswith("multipart/form-data")
        length = headers.get(b"content-length", b"").decode("latin-1")
        sent = {"started": False, "rejected": None, "events": False}

        async def send_guarded(message) -> None:
            if sent["rejected"] is not None:
                return  # the app's answer to a body we cut off is replaced by ours
            if message["type"] == "http.response.start":
                sent["started"] = True
                sent["events"] = (b"content-type", b"text/event-stream") in [
                    (name.lower(), value.partition(b";")[0].strip())
                    for name, value in message.get("headers", [])
                ]
                message = {**message, "headers": self._headers(path, message.get("headers", []))}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        async def answer(error: ApiError) -> None:
            self.metrics.error(error.code or error.type)
            if error.status in (408, 413, 415):  # the body is not read (whole): end the connection
                error.headers = {**error.headers, "Connection": "close"}
            await error.response()(scope, receive, send_guarded)

        if length.isdigit() and int(length) > limit:
            await answer(_too_large(limit, upload, int(length)))
            return
        if b"content-length" in headers and b"transfer-encoding" in headers:
            # framed two ways: a proxy in front may read another request into it (smuggling);
            # RFC 9112 6.1: refused, and the connection closed after
            error = ApiError(
                400,
                "a request may not have both Content-Length and Transfer-Encoding",
                code="ambiguous_length",
            )
            error.headers = {"Connection": "close"}
            await answer(error)
            return
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            await answer(
                ApiError(
                    415,
                    f"request bodies with Content-Encoding {encoding!r} are not supported; "
                    "send the body uncompressed",
                    code="unsupported_media_type",
                )
            )
            return

        received = {"bytes": 0, "done": False}
        timeout = self.settings.body_timeout
        # the whole body within the request's timeout too: a byte every few seconds, under the
        # pause limit, held the connection and its handler for ever
        total = self.settings.request_timeout
        deadline = asyncio.get_running_loop().time() + total

        async def receive_guarded():
            if received["done"]:
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(timeout, left)))
            except asyncio.TimeoutError:
                slow = left <= timeout
                error = ApiError(
                    408,
                    f"the request body took longer than {total:g} s to arrive"
                    if slow
                    else f"the request body stopped arriving ({timeout:g} s without data)",
                    code="body_timeout",
                )
                sent["rejected"] = error
                raise BodyRejected(error) from None
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > limit:
                    error = _too_large(limit, upload)
                    sent["rejected"] = error
                    raise BodyRejected(error)
                if not message.get("more_body", False):
                    received["done"] = True
            else:
                received["done"] = True
            return message

        app_receive = receive_guarded
        if is_json_media(content_type) or (
            not content_type and scope["method"] in ("POST", "PUT", "PATCH")
        ):
            # JSON bodies are small and read whole anyway: read them here, within the limits,
            # so text that is not Unicode is refused naming its field, whatever the route
            try:
                body = await _read_body(receive_guarded)
            except BodyRejected:
                error, sent["rejected"] = sent["rejected"], None
                await answer(error)
                return
            except asyncio.CancelledError:  # a body still arriving at shutdown's end
                await _cancelled(scope, sent, answer, send_guarded, self.metrics)
                return
            unreadable = unreadable_json(body) or too_much_structure(
                body, json_structure_limit(self.settings)
            )
            if unreadable is not None:
                await answer(ApiError(400, unreadable, code="invalid_json"))
                return
            field = lone_surrogate_field(body)
            if field is not None:
                await answer(
                    ApiError(
                        400,
                        f"{field} is not valid Unicode text: it contains a lone UTF-16 surrogate",
                        code="invalid_text",
                        param=field,
                    )
                )
                return
            app_receive = _replay(body, receive)

        try:
            await self.app(scope, app_receive, send_guarded)
        except StreamTruncated as exc:
            if not sent["started"]:
                raise
            # Headers and some audio are out: end the connection without the final chunk, so the
            # client sees an incomplete body instead of a short file that looks complete.
            self.metrics.count("truncated_streams_total")
            CUT_ON_PURPOSE.set(True)  # (uvicorn's own error line about it is not logged)
            log.warning(
                "stream aborted before its end: %s",
                exc,
                extra={"request_id": scope.get("state", {}).get("request_id")},
            )
            return
        except BodyRejected:
            if sent["rejected"] is None or sent["started"]:
                raise
        except asyncio.CancelledError:
            await _cancelled(scope, sent, answer, send_guarded, self.metrics)
            return
        if sent["rejected"] is not None and not sent["started"]:
            error, sent["rejected"] = sent["rejected"], None
            await answer(error)


def is_json_media(content_type: str) -> bool:
    """Whether a body of ``content_type`` is parsed as JSON (FastAPI takes application/json and
    every application/*+json): such bodies are all checked before they are parsed (a +json one
    had skipped the checks: 4.5 M empty arrays parsed on the event loop, 300 MB each)."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


SHUTTING_DOWN = "the server is shutting down: the synthesis was stopped before its end"
# set in a request's scope["state"] where a cancelled request task means its client went away
# (Ray Serve cancels it then); elsewhere only uvicorn's graceful shutdown cancels one
CANCEL_IS_DISCONNECT = "cancel_is_disconnect"


def _uncancel() -> None:
    """The request task's cancellation is answered here: it ends normally (Python 3.11+)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


async def _cancelled(scope, sent: dict, answer, send, metrics: Metrics) -> None:  # noqa: ANN001
    """A request task cancelled: its client gone where the server says a cancel means that
    (Ray Serve's replicas: ClientGone raised), else the end of uvicorn's shutdown grace."""
    if scope.get("state", {}).get(CANCEL_IS_DISCONNECT):
        _uncancel()
        raise ClientGone from None
    await _stopped_at_shutdown(scope, sent, answer, send, metrics)


async def _stopped_at_shutdown(scope, sent: dict, answer, send, metrics: Metrics) -> None:  # noqa: ANN001
    """A request uvicorn cancelled (the only canceller of request tasks: its graceful shutdown
    ran out of --shutdown-timeout) ends as documented, not in a plain-text 500 and a traceback:
    503 JSON before any audio, an ``error`` event ending server-sent events, a chunked
    transfer aborted (no final chunk: the client sees an incomplete body)."""
    _uncancel()
    error = ApiError(503, SHUTTING_DOWN, "server_error", "shutting_down")
    if not sent["started"]:
        await answer(error)
        return
    metrics.count("truncated_streams_total")
    request_id = scope.get("state", {}).get("request_id")
    log.warning(
        "stream aborted before its end: %s", SHUTTING_DOWN, extra={"request_id": request_id}
    )
    if sent["events"]:
        body = sse_event({"type": "error", "error": error.body()["error"]})
        with contextlib.suppress(Exception):  # the client may be gone too
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
    CUT_ON_PURPOSE.set(True)  # (uvicorn's own error line about it is not logged)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # a part of a body: nothing to answer
            raise ClientGone
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that hands out ``body`` once, then whatever comes next (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        if pending:
            return pending.pop()
        return await receive()

    return replayed
