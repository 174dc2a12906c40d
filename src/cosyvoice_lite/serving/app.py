"""The FastAPI application: the simple /tts API, the OpenAI speech API, the voice library, health,
metrics and the web page.

    app = create_app(lambda: Engine.load("CosyVoice-300M-SFT"), Settings(max_queue=4))

Given a loader, the model loads once in a background thread: /health answers at once and /ready
says 503 until the model is there and warm (``Engine.wait_until_warm``). Synthesis runs in the
engine loop, which computes all admitted requests together (see scheduler.py and
../engine_loop.py).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from .. import __version__
from ..audio.io import AUDIO_FORMATS, MIN_PROMPT_SECONDS
from ..errors import CosyVoiceError
from .docs import docs_router
from .encoding import EncodingPool
from .errors import (
    CLIENT_CLOSED,
    ApiError,
    ClientGone,
    from_engine_error,
    not_ready,
    route_fields,
)
from .guard import (
    DOC_PATHS,
    SECURITY_HEADERS,
    GuardMiddleware,
    app_path,
    check_texts,
    is_json_media,
    quiet_cut_streams,
)
from .logs import printable
from .metrics import Metrics
from .openai_api import openai_router, voice_aliases
from .openapi import audio_response, install_openapi
from .outputs import OutputStore
from .page_info import page_info
from .prompts import PromptCache
from .scheduler import Scheduler
from .schemas import TTSRequest
from .server import OVER_CONNECTION_CAP
from .settings import Settings, host_name
from .synthesis import Plan, model_voices, plan_request, respond, supported_modes
from .upload_api import upload_router
from .voice_create import prepare_saved_voices, read_voice_upload, save_voice
from .voice_store_s3 import attachment, voice_store
from .voices import VoiceLibrary, validate_name

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("cosyvoice_lite.serving")
WARM_UP_SECONDS = 300  # the most a loading server waits for the engine's warm-up before ready
PLANNING_THREADS = 64  # requests planned at once (each may wait on the voice storage)
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a given X-Request-Id kept
access_log = logging.getLogger("cosyvoice_lite.serving.access")

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = {"/", "/health", "/ready", "/info", "/favicon.ico"}  # docs: Settings.docs_public
QUIET_ENDPOINTS = {"/health", "/ready", "/metrics"}
# the methods metrics and the access log name; any other token counts as "OTHER"
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}


class ServerState:
    """What the request handlers share: settings, engine (once loaded), queue, library, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(settings.workers, settings.max_queue)
        self.outputs = OutputStore(
            settings.outputs_dir,
            settings.s3,
            self.metrics,
            settings.spool_dir,
            settings.shutdown_timeout,
            settings.outputs_keep_days,
        )
        self.library = VoiceLibrary(
            voice_store(settings),
            storage_waiters=settings.storage_waiters,
            max_voices=settings.max_voices,
        )
        self.encoding = EncodingPool()  # responses are encoded here, not on the engine loop
        self.engine = None
        self.status = "loading"
        self.load_error = ""
        self.started = time.time()
        self.stopping = threading.Event()  # set when the server shuts down
        self.serving = False  # the app's lifespan has started (not merely built)
        self.preparer: threading.Thread | None = None  # prepare_saved_voices, once
        self._preparer_lock = threading.Lock()
        self.metrics.gauge(
            "queue_depth", "Requests waiting for a synthesis worker.", lambda: self.scheduler.queued
        )
        self.metrics.gauge(
            "requests_in_flight",
            "Admitted requests not finished yet.",
            lambda: self.scheduler.in_flight,
        )
        self.metrics.gauge(
            "queue_capacity",
            "Requests admitted at most (workers + queue).",
            lambda: self.scheduler.capacity,
        )
        self.metrics.gauge(
            "model_loaded",
            "1 once the model is loaded and warm (as /ready).",
            lambda: 1.0 if self.status == "ready" else 0.0,
        )
        self.metrics.gauge(
            "saved_voices", "Usable voices in the library.", lambda: self.library.counts()[0]
        )
        self.metrics.gauge(
            "broken_voices",
            "Library entries that cannot be used (GET /voices).",
            lambda: self.library.counts()[1],
        )
        self.metrics.gauge(
            "voice_storage_waiting",
            "Calls waiting on the voice storage now (at most storage_waiters; more get 503).",
            lambda: self.library.storage_waiting,
        )
        self.metrics.gauge(
            "voice_storage_ok",
            "1 while voices can be stored (else see /ready).",
            lambda: 0.0 if self.library.health() else 1.0,
        )

    @staticmethod
    def storage_call(fn: Callable[[], Any]) -> Future:
        """Run ``fn`` (voice storage I/O, which may be slow or hang) on a thread of its own,
        neither the event loop nor the engine loop; daemon, so a hung call never holds up exit."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        threading.Thread(target=run, name="cosyvoice-storage", daemon=True).start()
        return future

    def set_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.scheduler.runner = engine.call  # model work run as a job goes to the engine loop
        loop = getattr(engine, "loop", None)  # a wrapped engine may have none
        if loop is not None:
            self.metrics.counter(
                "batched_decode_steps_total",
                "LLM decode steps that computed several requests together.",
                lambda: loop.steps,
            )
            self.metrics.counter(
                "batched_decode_rows_total",
                "Requests those steps decoded.",
                lambda: loop.rows_stepped,
            )
            self.metrics.counter(
                "flow_calls_total",
                "Flow computations of streams' chunks (a batch of streams counts once).",
                lambda: loop.flow_calls[0],
            )
            self.metrics.counter(
                "flow_stream_chunks_total",
                "Stream chunks those flow computations covered.",
                lambda: loop.flow_calls[1],
            )
        self.status = "ready"
        self.prepare_voices()
        self.metrics.info = {
            "name": engine.model.name,
            "version": str(engine.version),
            "variant": engine.model.variant,
            "sample_rate": str(engine.sample_rate),
        }

    def prepare_voices(self) -> None:
        """Start preparing the saved voices for streaming, once the app serves and the model is
        loaded (whichever comes last; an app that is only built prepares nothing)."""
        with self._preparer_lock:
            if not (self.serving and self.status == "ready" and self.settings.prepare_voices):
                return
            if self.preparer is None:
                self.preparer = threading.Thread(
                    target=prepare_saved_voices, args=(self,), name="voice-preparer", daemon=True
                )
                self.preparer.start()

    def load(self, loader: Callable[[], Engine]) -> None:
        try:
            engine = loader()
            # ready once warm: a request before would wait for the flow's graphs all the same
            warm = getattr(engine, "wait_until_warm", None)  # a wrapped engine may have none
            if warm is not None and not warm(0):
                log.info("warming up: tracing the flow's graphs before reporting ready")
                if not warm(WARM_UP_SECONDS):
                    log.warning("still warming up after %d s; serving", WARM_UP_SECONDS)
            if self.stopping.is_set():
                return  # shut down meanwhile (the engine closed at exit)
            self.set_engine(engine)
            log.info("model ready", extra={"model": self.engine.model.name})
        except Exception as exc:  # noqa: BLE001 - reported by /ready and every synthesis call
            self.status = "failed"
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.load_error, exc_info=exc)

    @property
    def public_load_error(self) -> str:
        """What /ready and /info, which answer without the API key, say of a failed load: with
        a key set, not its text (paths, file names): that is in the server's log."""
        if self.load_error and self.settings.api_key:
            return "see the server's log"
        return self.load_error

    def require_engine(self) -> Engine:
        if self.status != "ready":
            raise not_ready(self.status, self.load_error)
        return self.engine


# ---------------------------------------------------------------------------------- middleware


def _route_path(app: FastAPI, scope) -> str:
    """The route's template (``/v1/models/{model}``), for metrics and the quiet log: never the
    raw path, which a client (with or without the key) makes up at will, a new series each.
    HEAD is answered wherever GET is (guard.py), so it is matched as GET."""
    probe = {**scope, "method": "GET"} if scope["method"] == "HEAD" else scope
    return _template(app.router.routes, probe) or "unmatched"


def _slash_hint(app: FastAPI, scope) -> str | None:
    """For a path that names a route but for its slashes (a base URL ending in "/v1/" joined
    to "/audio/speech", a trailing slash), a 404 message naming the route: the app does not
    redirect (create_app)."""
    path = app_path(scope)
    tidy = re.sub("/{2,}", "/", path).rstrip("/") or "/"
    probe = {**scope, "path": tidy, "root_path": ""}
    if scope["method"] == "HEAD":
        probe["method"] = "GET"
    if tidy == path or _template(app.router.routes, probe) is None:
        return None
    return f"no route {path}; did you mean {tidy}?"


def _template(routes, scope) -> str | None:
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.NONE:
            continue
        # FastAPI wraps an included router's routes (no path of its own): its routes decide
        inner = getattr(route, "original_router", None)
        found = _template(inner.routes, scope) if inner is not None else None
        if found is None:
            found = getattr(route, "path_format", getattr(route, "path", None))
        if match == Match.FULL and found is not None:
            return found or "/"  # ("": the route prefix without its slash, redirected)
        if partial is None:
            partial = found  # the path, not the method (405)
    return partial


class _Cors(CORSMiddleware):
    """Starlette's CORS (``--cors-origin``), a refused preflight answered as every error is:
    JSON with a code, counted (it was a plain-text "Disallowed CORS origin")."""

    def __init__(self, app, origins: list[str], metrics: Metrics) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            # any request header: the origins are the allow-list, and SDKs add their own
            # (the OpenAI JS SDK's X-Stainless-*, OpenAI-Organization) to every call
            allow_headers=["*"],
            expose_headers=[
                "X-Request-Id",
                "X-Sample-Rate",
                "X-Audio-Duration",
                "X-Real-Time-Factor",
                "Retry-After",
            ],
        )
        self.metrics = metrics

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        # Starlette's text names what failed: "Disallowed CORS origin, method"
        failed = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        hint = " (--cors-origin lists the allowed origins)" if "origin" in failed else ""
        headers = {
            k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")
        }
        error = ApiError(
            400, f"CORS preflight refused: {failed} not allowed{hint}", code="cors_refused"
        )
        error.headers.update(headers)
        self.metrics.error(error.code)
        return error.response()


class ServingMiddleware:
    """Request ids, optional API key, metrics and one structured access-log line per request.
    Outermost (but for Starlette's own error middleware): CORS's preflights, refusals and
    unexpected errors are logged, counted and carry the X-Request-Id as every answer does."""

    def __init__(self, app, fastapi_app: FastAPI, state: ServerState) -> None:
        self.fastapi_app, self.state = fastapi_app, state
        origins = state.settings.cors_origins  # CORS stays off unless origins are configured
        # inside this middleware, so that the answers given here carry CORS's headers too
        self.cors = _Cors(app, origins, state.metrics) if origins else None
        self.app = self.cors or app

    def _authorized(self, scope, headers: dict[bytes, bytes]) -> bool:
        key = self.state.settings.api_key
        path = app_path(scope)  # /health is public under a route prefix too
        if (
            not key
            or path in PUBLIC_PATHS
            or path.startswith("/static/")
            or scope["method"] == "OPTIONS"
        ):
            return True
        if self.state.settings.docs_public and path.startswith(DOC_PATHS):
            return True
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), key.encode()
        )

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> ApiError | None:
        """Why the request is answered here without reaching a route, if it is: a connection
        past the cap (probes and scrapes still answered), a Host name this server does not
        answer to, another site's page writing, no or a wrong key."""
        settings = self.state.settings
        if (
            scope.get("state", {}).get(OVER_CONNECTION_CAP)
            and app_path(scope) not in QUIET_ENDPOINTS
        ):
            return ApiError(
                503,
                f"too many open connections (the server's --max-connections "
                f"{settings.max_connections}): retry shortly",
                "server_error",
                "too_many_connections",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        if self._foreign_host(headers):
            return ApiError(
                400,
                f"unknown Host name: this server answers to {', '.join(settings.allowed_hosts)} "
                "(--allowed-host)",
                code="unknown_host",
            )
        if self._cross_site_write(scope["method"], headers):
            return ApiError(
                403,
                "a request from another site's page is refused unless its origin is allowed "
                "(--cors-origin)",
                "permission_error",
                "cross_site_refused",
            )
        if not self._authorized(scope, headers):
            return ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    def _cross_site_write(self, method: str, headers: dict[bytes, bytes]) -> bool:
        """A browser's write from another site's page (the browser says so: Sec-Fetch-Site),
        from an origin not allowed. A form or a no-cors fetch needs no CORS preflight, so any
        page a user visited could save voices on a keyless server on their machine, or fill
        its library."""
        if method in ("GET", "HEAD", "OPTIONS"):
            return False
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
        origin = headers.get(b"origin", b"").decode("latin-1")
        allowed = self.state.settings.cors_origins
        return site in ("cross-site", "same-site") and "*" not in allowed and origin not in allowed

    def _foreign_host(self, headers: dict[bytes, bytes]) -> bool:
        """A Host name this server does not answer to (``Settings.allowed_hosts``)."""
        allowed = self.state.settings.allowed_hosts
        if not allowed:
            return False
        host = headers.get(b"host", b"").decode("latin-1")
        # none: HTTP/1.0 probes (a browser always names one)
        return bool(host.strip()) and host_name(host) not in allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        # a caller's or a proxy's id (UUIDs, trace ids) is kept, so that logs correlate; it also
        # names result files, hence the safe characters only
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "started": False}
        security = self.state.settings.security_headers

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                if b"x-request-id" not in present:
                    headers.append((b"x-request-id", request_id.encode()))
                if security:  # (GuardMiddleware's, on the answers given out here)
                    headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                message = {**message, "headers": headers}
            await send(message)

        async def answer(error: ApiError) -> None:
            """Answer here, with CORS's headers as a route's answer has them."""
            self.state.metrics.error(error.code)
            out = send_wrapper
            # (Starlette up to 0.47 reads the Origin header in send: a request without one, curl's
            # or an SDK's, had its 401 turned into a 500 KeyError)
            if self.cors is not None and any(k == b"origin" for k, _ in scope["headers"]):
                out = functools.partial(
                    self.cors.send, send=send_wrapper, request_headers=Headers(scope=scope)
                )
            await error.response()(scope, receive, out)

        try:
            refused = self._refusal(scope, dict(scope["headers"]))
            if refused is not None:
                await answer(refused)  # (counted: alerts on refused keys read it)
            else:
                await self.app(scope, receive, send_wrapper)
        except (ClientGone, ClientDisconnect):  # not a server's or a request's fault
            status["code"] = CLIENT_CLOSED
        except Exception as exc:
            if status["started"]:
                raise  # too late for an answer: uvicorn ends the connection
            # answered here, not by Starlette's ServerErrorMiddleware outside this one: the
            # log line and the 500 carry the request's id
            log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
            await answer(internal_error(exc))
        finally:
            endpoint = _route_path(self.fastapi_app, scope)
            # h11 passes any token as a method: made-up ones would each be a new series for good
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            self.state.metrics.request(method, endpoint, status["code"])
            if self.state.settings.log_requests:
                # probes and scrapes arrive every few seconds: keep them out of the INFO log
                level = logging.DEBUG if endpoint in QUIET_ENDPOINTS else logging.INFO
                path = printable(scope["path"])
                access_log.log(
                    level,
                    "%s %s %d",
                    method,
                    path,
                    status["code"],
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "path": path,
                        "status": status["code"],
                        "duration_ms": round((time.monotonic() - start) * 1000, 1),
                    },
                )


# ---------------------------------------------------------------------------------- errors


def _validation_error(exc: RequestValidationError, path: str, content_type: str) -> ApiError:
    """A body the route's schema refuses: 422, or 400 on the OpenAI routes, as OpenAI answers
    (its clients raise BadRequestError for it); 415 for a body sent as something else than
    JSON (curl's ``-d`` sends application/x-www-form-urlencoded)."""
    errors = exc.errors()
    media = content_type.partition(";")[0].strip().lower()
    json_type = not media or is_json_media(media)
    if not json_type and any(e.get("loc", ())[:1] == ("body",) for e in errors):
        return ApiError(
            415,
            f"the request body must be JSON (Content-Type: application/json), got {media!r}",
            code="unsupported_media_type",
        )
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    parts, param = [], None
    for error in errors:
        loc = [str(x) for x in error.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]  # where it was sent, not what
        param = param or (loc[0] if loc else None)  # the field ("voice", not "voice.str")
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    status = 400 if path.startswith("/v1/") else 422
    return ApiError(
        status, "invalid request: " + "; ".join(parts), code="invalid_request", param=param
    )


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    def counted(error: ApiError) -> JSONResponse:
        state.metrics.error(error.code or error.type)
        return error.response()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return counted(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        return counted(_validation_error(exc, app_path(request.scope), content_type))

    @app.exception_handler(CosyVoiceError)
    async def engine_error(request: Request, exc: CosyVoiceError):
        modes = supported_modes(state.engine) if state.engine is not None else []
        return counted(from_engine_error(exc, modes, route_fields(app_path(request.scope))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        hint = _slash_hint(app, request.scope) if exc.status_code == 404 else None
        return counted(
            ApiError(
                exc.status_code,
                hint or str(exc.detail),
                kind,
                f"http_{exc.status_code}",
                headers=dict(exc.headers or {}),
            )
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # (ServingMiddleware answers first)
        request_id = request.scope.get("state", {}).get("request_id")  # (raised mid-response)
        log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
        return counted(internal_error(exc))


def internal_error(exc: Exception) -> ApiError:
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error")


# ---------------------------------------------------------------------------------- the app


def create_app(engine: Engine | Callable[[], Engine], settings: Settings | None = None) -> FastAPI:
    """The server application for an engine, or for a loader (a callable returning an engine),
    which then runs once in the background when the server starts."""
    settings = settings or Settings()
    quiet_cut_streams()
    state = ServerState(settings)
    loader = engine if callable(engine) and not hasattr(engine, "synthesize") else None
    if loader is None:
        state.set_engine(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.serving = True
        # requests are planned on the loop's default executor (asyncio.to_thread), and planning
        # may wait on the voice storage: its default size (CPUs + 4: 6 threads on 2 cores) would
        # let a few requests waiting on a hung bucket hold up every other request's planning
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(PLANNING_THREADS, thread_name_prefix="cosyvoice-plan")
        )
        state.prepare_voices()
        if loader is not None and state.status == "loading":
            threading.Thread(
                target=state.load, args=(loader,), name="model-loader", daemon=True
            ).start()
        yield
        state.stopping.set()
        if state.preparer is not None:  # its current voice, within the shutdown time
            await asyncio.to_thread(state.preparer.join, settings.shutdown_timeout)
        state.scheduler.shutdown()
        state.encoding.shutdown()
        state.outputs.shutdown()

    app = FastAPI(
        title="cosyvoice-lite",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,  # served offline by docs.py
        # no 307 from /tts/ to an absolute http:// URL (wrong behind a TLS proxy): a clear 404
        redirect_slashes=False,
        # a JSON body sent with no Content-Type (requests' data=json.dumps(...)) is read as
        # JSON, as the guard and the 415 check assume; other sites' pages are refused by
        # Sec-Fetch-Site (GuardMiddleware), not by this
        strict_content_type=False,
        description="CosyVoice text-to-speech: simple API, OpenAI speech API, voice library.",
    )
    app.state.server = state
    _install_error_handlers(app, state)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=state.metrics)  # inside auth
    # outermost, CORS (--cors-origin) inside it: preflights are logged and counted too
    app.add_middleware(ServingMiddleware, fastapi_app=app, state=state)
    _add_operations_routes(app, state)
    _add_tts_routes(app, state)
    _add_voice_routes(app, state)
    prompts = PromptCache(settings.prompt_cache_size, settings.prompt_cache_ttl, state.metrics)
    app.include_router(upload_router(state, prompts))
    app.include_router(openai_router(state, prompts))
    app.include_router(docs_router(app.title))
    _add_page_routes(app)
    # every status and the configured limits in /openapi.json
    install_openapi(app, settings, PUBLIC_PATHS)
    return app


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex[:16]


def _add_operations_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", tags=["operations"])
    async def health():
        """Liveness: answers at once, even while the model loads."""
        return {
            "status": "ok",
            "model": state.status,
            "uptime": round(time.time() - state.started, 1),
        }

    @app.get("/ready", tags=["operations"])
    async def ready():
        """Readiness: 200 once the model is loaded and warm (its flow's graphs traced), 503
        before (or if loading failed)."""
        if state.status != "ready":
            raise not_ready(state.status, state.public_load_error)
        # synthesis works without the voice storage: degraded, not unready (see docs/OPERATIONS.md)
        storage: dict[str, str] = {}
        problem = await asyncio.to_thread(state.library.health)
        if problem:
            storage.update(voices="degraded", error=problem)
        problem = state.outputs.health()  # results kept as configured (saved, uploaded)?
        if problem:
            storage.update(outputs="degraded", outputs_error=problem)
        if storage:
            return {"status": "degraded", "model": state.engine.model.name, "storage": storage}
        return {"status": "ready", "model": state.engine.model.name}

    @app.get("/info", tags=["operations"])
    async def info():
        """What the web page needs to know: model, modes, limits, formats, whether a key is needed."""
        engine = state.engine
        model = None
        if engine is not None:
            model = {
                "name": engine.model.name,
                "version": engine.version,
                "variant": engine.model.variant,
                "sample_rate": engine.sample_rate,
                "modes": supported_modes(engine),
                "instruct": "instruct" in supported_modes(engine),
                "instruct_needs_preset": engine.spec.instruct_with_preset,
                **page_info(engine),
            }
        s = state.settings
        return {
            "server": "cosyvoice-lite",
            "version": __version__,
            "status": state.status,
            "error": state.public_load_error or None,
            "model": model,
            "auth_required": bool(s.api_key),
            "formats": list(AUDIO_FORMATS),
            "limits": {
                "max_text_chars": s.max_text_chars,
                "max_upload_bytes": s.max_upload_bytes,
                "max_prompt_seconds": s.max_prompt_seconds,
                "min_prompt_seconds": MIN_PROMPT_SECONDS,
                "max_instruct_chars": s.max_instruct_chars,
                "max_prompt_text_chars": s.max_prompt_text_chars,
                "max_json_bytes": s.max_json_bytes,
                "request_timeout": s.request_timeout,
                "workers": s.workers,
                "max_queue": s.max_queue,
            },
        }

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics():  # a plain function: its voice gauges may wait a moment on the storage
        """Prometheus text format."""
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_tts_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/speakers", tags=["simple API"])
    def speakers():  # plain functions run off the event loop: the library reads its storage
        """Every usable voice: the model's own (``preset``, or ``cloned``: prompt features stored
        with the model, spoken as a saved voice is) and the saved voices."""
        engine = state.require_engine()
        presets = model_voices(engine)
        saved = [
            {
                "name": v.name,
                "kind": "saved",
                "prompt_text": v.prompt_text,
                "duration": round(v.duration, 3),
            }
            for v in state.library.list()
        ]
        return {"speakers": presets + saved, "modes": supported_modes(engine)}

    @app.post(
        "/tts",
        tags=["simple API"],
        responses={200: audio_response("the audio (wav unless format names another)")},
    )
    async def tts(body: TTSRequest, request: Request):
        """Text to audio (wav by default). With ``stream`` the audio is sent while it is made
        (wav with an open-ended header, or raw 16-bit PCM at X-Sample-Rate)."""
        state.require_engine()
        check_texts(state.settings, text=body.text, speaker=body.speaker, instruct=body.instruct)
        synthesis, saved = await asyncio.to_thread(  # it reads the voice library's storage
            plan_request,
            state,
            text=body.text,
            voice=body.speaker,
            instruct=body.instruct,
            speed=body.speed,
            seed=body.seed,
            mode=body.mode,
            engine_stream=body.stream,
        )
        plan = Plan(
            synthesis,
            saved,
            body.format,
            None,
            "stream" if body.stream else "whole",
            "/tts",
            _request_id(request),
        )
        return await respond(state, request, plan)


def _add_voice_routes(app: FastAPI, state: ServerState) -> None:
    library = state.library
    upload_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["name", "audio"],
                        "properties": {
                            "name": {"type": "string"},
                            "prompt_text": {
                                "type": "string",
                                "description": "transcript of the audio (also 'transcript'); "
                                "without one the voice is used cross-lingually",
                            },
                            "audio": {"type": "string", "format": "binary"},
                        },
                    }
                }
            },
        }
    }

    @app.post("/voices", status_code=201, tags=["voice library"], openapi_extra=upload_schema)
    async def create_voice(request: Request):
        """Save a voice: prompt recording + its transcript (optional: without one the voice is
        used cross-lingually). Its features are computed once and stored on disk."""
        state.require_engine()  # 503 while the model loads (its voices name the aliases)
        upload = await read_voice_upload(
            request, state.settings, ("audio",), ("prompt_text", "transcript")
        )
        return await save_voice(state, upload, reserved=voice_aliases(state))

    @app.get("/voices", tags=["voice library"])
    def list_voices():
        """Saved voices; entries that cannot be used are listed under ``broken`` with a reason."""
        voices, broken = library.scan()
        return {
            "object": "list",
            "data": [v.to_api() for v in voices],
            "broken": [b.to_api() for b in broken],
        }

    @app.get("/voices/{name}", tags=["voice library"])
    def get_voice(name: str):
        return library.get(validate_name(name)).to_api()

    @app.get(
        "/voices/{name}/audio",
        tags=["voice library"],
        responses={200: {"content": {"audio/wav": {}}, "description": "the recording"}},
    )
    async def get_voice_audio(name: str):
        """The stored prompt recording (WAV)."""
        # opened first (an unknown voice is a 404, not a cut 200), then sent a chunk at a time,
        # each read on a thread: never the whole file in memory per download
        audio = await asyncio.to_thread(library.open_audio, validate_name(name))
        headers = {**attachment(f"{name}.wav"), "content-length": str(audio.size)}
        return StreamingResponse(audio, media_type="audio/wav", headers=headers)

    @app.delete("/voices/{name}", tags=["voice library"])
    def delete_voice(name: str):
        library.delete(validate_name(name))
        return {"id": name, "object": "audio.voice", "deleted": True}


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("", include_in_schema=False)
    @app.get("/static/index.html", include_in_schema=False)
    async def page_elsewhere(request: Request):
        # under a route prefix (root_path, e.g. Ray Serve's route_prefix) "/prefix" reaches the
        # app as an empty path, and the page's file is also served as /static/index.html: its
        # URLs are relative to it, so it is "/prefix/"
        target = request.scope.get("root_path", "").rstrip("/") + "/"
        if request.url.query:
            target += f"?{request.url.query}"
        return RedirectResponse(target, status_code=307)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


__all__ = ["create_app", "ServerState", "Settings"]
