"""From an HTTP request to audio bytes: voice resolution, the worker job, and the responses
(complete file, chunked audio stream, or server-sent events)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ..audio.io import media_type
from ..errors import CosyVoiceError, InvalidRequestError, UnsupportedModeError
from ..request import Mode, SynthesisRequest
from .errors import (
    ApiError,
    ClientGone,
    field_name,
    from_engine_error,
    overloaded,
    route_fields,
)
from .guard import CANCEL_IS_DISCONNECT
from .scheduler import Job, JobTimeout, Overloaded
from .streaming import (
    Encoder,
    StreamTruncated,
    WholeEncoder,
    output_rate,
    seconds_to_tokens,
    sse_delta,
    sse_done,
    sse_event,
)
from .voices import unknown_voice

if TYPE_CHECKING:
    from ..engine import Engine, PromptSource
    from ..frontend.prompt import PromptFeatures
    from .app import ServerState

log = logging.getLogger("cosyvoice_lite.serving")


@dataclass
class Summary:
    """The last item a synthesis job hands over: what was produced, and how fast."""

    audio_seconds: float
    compute_seconds: float
    first_audio_seconds: float | None


@dataclass
class Plan:
    """Everything decided before a request is queued."""

    request: SynthesisRequest
    saved_voice: str | None  # a library voice whose features stand in for prompt audio
    format: str
    out_rate: int | None  # resample the output (OpenAI pcm is 24 kHz)
    transport: str  # "whole", "stream" or "sse"
    endpoint: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # a one-off prompt sent with the request: its features, computed (or cached) in the worker
    prompt: Callable[[], PromptFeatures] | None = None


def voice_key(engine: Engine) -> str:
    """Prompt features depend on the model family (speech tokenizer version, mel rate)."""
    return f"v{engine.version}-{engine.sample_rate}"


def saved_features(state: ServerState, name: str) -> PromptFeatures:
    """A saved voice's features, read from the library on the calling thread, never the engine
    loop's: storage that is slow or hangs (an S3 bucket) must not hold up the loop, which steps
    every other request. Features that are not stored are computed on that thread too, beside
    the loop's decoding, as requests' prompts are (the engine's preparing thread)."""
    engine = state.engine
    return state.library.features(name, voice_key(engine), engine.encode_prompt)


def preset_voices(engine: Engine) -> list[str]:
    """The model's voices that speak as themselves (mode preset), sorted."""
    return [name for name in engine.voices() if not engine.is_cloned_voice(name)]


def model_voices(engine: Engine) -> list[dict]:
    """The voices stored with the model, for the voice lists: kind ``preset`` or ``cloned``."""
    return [
        {"name": n, "kind": "cloned" if engine.is_cloned_voice(n) else "preset"}
        for n in engine.voices()
    ]


def supported_modes(engine: Engine) -> list[str]:
    return [m.value for m in engine.modes]


def require_text(text: str, field: str) -> None:
    """Text with something in it (``field``: the route's name for it)."""
    if not text.strip():
        raise ApiError(400, "text is empty: give the text to speak", code="empty_text", param=field)


def plan_request(
    state: ServerState,
    *,
    text: str,
    voice: str,
    instruct: str | None,
    speed: float,
    seed: int | None,
    mode: str | None,
    engine_stream: bool,
    fields: Mapping[str, str] | None = None,
) -> tuple[SynthesisRequest, str | None]:
    """Check the text and pick the mode from the voice: preset -> preset (or instruct with an
    instruction, v1-Instruct), saved voice -> zero-shot (cross-lingual without a transcript, or
    instruct with an instruction on v2/v3). ``fields``: the route's names for the request's
    fields, which errors name (``route_fields``)."""
    engine = state.engine
    text_field = field_name(fields, "text")
    instruct_field = field_name(fields, "instruct")
    limit = state.settings.max_text_chars
    if len(text) > limit:
        raise ApiError(
            400,
            f"text is too long: {len(text)} characters, the limit is {limit}; split "
            "it into several requests (the server's --max-text-chars raises the limit)",
            code="text_too_long",
            param=text_field,
            max_chars=limit,
        )
    require_text(text, text_field)
    instruct = (instruct or "").strip() or None
    library = state.library
    stored_clone = engine.is_cloned_voice(voice)
    if voice in engine.presets:
        saved = None
        chosen = Mode.INSTRUCT if instruct else (Mode.ZERO_SHOT if stored_clone else Mode.PRESET)
        if instruct and not stored_clone and not engine.spec.instruct_with_preset:
            raise ApiError(
                400,
                f"{voice!r} is a preset voice: {engine.model.name} follows instructions in a "
                "cloned voice (a saved voice, or prompt audio sent along), not in a preset",
                code="unsupported_instructions",
                param=instruct_field,
            )
    elif library is not None and library.exists(voice):
        saved = voice
        if instruct:
            if engine.spec.instruct_with_preset:
                raise InvalidRequestError(
                    "CosyVoice v1 follows instructions only with its preset voices (the -Instruct "
                    "model); saved voices take instructions with CosyVoice2/3"
                )
            chosen = Mode.INSTRUCT
        else:
            chosen = Mode.ZERO_SHOT if library.get(voice).prompt_text else Mode.CROSS_LINGUAL
    else:
        raise unknown_voice(voice, engine.voices() + (library.listed_names() if library else []))
    if mode is not None:
        chosen = Mode(mode)
        cloned = saved is not None or stored_clone
        if not cloned and chosen not in (Mode.PRESET, Mode.INSTRUCT):
            raise InvalidRequestError(
                f"mode '{chosen.value}' clones a prompt: use a saved voice, "
                f"not the preset {voice!r}"
            )
        if stored_clone and chosen == Mode.PRESET:
            raise InvalidRequestError(f"{voice!r} is a cloned voice: use it with mode zero_shot")
        if saved is not None and chosen == Mode.PRESET:
            raise InvalidRequestError(f"{voice!r} is a saved voice, not a preset")
        if chosen == Mode.ZERO_SHOT and saved and not library.get(voice).prompt_text:
            raise InvalidRequestError(
                f"voice {voice!r} has no transcript; zero-shot needs one (use cross_lingual)"
            )
    if chosen not in engine.modes:
        what = "follow instructions" if chosen == Mode.INSTRUCT else f"do mode '{chosen.value}'"
        if mode is None and chosen == Mode.INSTRUCT:  # the instruction asked for it, not a mode
            raise ApiError(
                400,
                f"{engine.model.name} (CosyVoice v{engine.version}, {engine.model.variant}) "
                f"cannot follow instructions; send none (it supports: "
                f"{', '.join(supported_modes(engine))})",
                code="unsupported_mode",
                param=instruct_field,
                supported_modes=supported_modes(engine),
            )
        raise UnsupportedModeError(
            f"{engine.model.name} (CosyVoice v{engine.version}, {engine.model.variant}) cannot {what}; "
            f"it supports: {', '.join(supported_modes(engine))}"
        )
    stream = engine_stream and speed == 1.0  # speed changes need the whole utterance
    request = SynthesisRequest(
        mode=chosen,
        text=text,
        voice=voice if saved is None else None,
        instruct=instruct,
        speed=speed,
        seed=seed,
        stream=stream,
    )
    return request, saved


class _Relay:
    """The engine side of a synthesis job, called from the engine loop thread: engine chunks ->
    encoded pieces on the job's queue, then a Summary, then the end. The encoding runs on the
    server's encoding pool, in order (``encoding.py``): the loop goes on with every row."""

    def __init__(self, state: ServerState, plan: Plan, job: Job, accepted_at: float) -> None:
        self.state, self.plan, self.job, self.accepted_at = state, plan, job, accepted_at
        engine = state.engine
        if plan.transport == "whole":
            self.encoder = WholeEncoder(plan.format, engine.sample_rate, plan.out_rate)
        else:
            self.encoder = Encoder(plan.format, engine.sample_rate, plan.out_rate)
        self.strand = state.encoding.strand()
        self.failed = False  # ended with an error: pieces still queued are not encoded
        self.keep = state.outputs.enabled
        self.kept: list[np.ndarray] = []
        self.audio_seconds, self.first = 0.0, None
        self.start = time.monotonic()

    def prompt(self) -> PromptFeatures | None:
        """A one-off upload's prompt features, computed on the engine's preparing thread (a saved
        voice's are read before the request is submitted: ``_start``)."""
        return self.plan.prompt() if self.plan.prompt is not None else None

    def chunk(self, chunk) -> None:
        if self.first is None:
            self.first = time.monotonic() - self.accepted_at
            self.state.metrics.first_audio_latency(self.first)
        self.audio_seconds += chunk.duration
        if self.keep:
            self.kept.append(chunk.samples)
        self.strand.submit(lambda: self._encode(chunk.samples))

    def end(self, error: BaseException | None) -> None:
        if error is not None or self.job.cancelled.is_set():
            self.failed = True
            self.job.finish(error)  # at once: a cancelled job has nobody left to tell
            return
        self.strand.submit(self._end)

    def _encode(self, samples: np.ndarray) -> None:
        if self.failed or self.job.cancelled.is_set():
            return
        try:
            piece = self.encoder.feed(samples)
        except Exception as exc:  # noqa: BLE001 - reported to the client as the job's error
            self.failed = True
            self.job.finish(exc)
            return
        if piece:
            self.job.put(piece)

    def _end(self) -> None:
        if self.failed:
            return
        try:
            self._complete()
        except Exception as exc:  # noqa: BLE001 - e.g. the encoder failed on the last piece
            self.job.finish(exc)
            return
        self.job.finish()

    def _complete(self) -> None:
        state, plan, engine = self.state, self.plan, self.state.engine
        tail = self.encoder.finish()
        if tail:
            self.job.put(tail)
        compute, audio_seconds, first = (
            time.monotonic() - self.start,
            self.audio_seconds,
            self.first,
        )
        state.metrics.synthesis(audio_seconds, compute)
        request = plan.request
        log.info(
            "synthesized %.2f s of audio in %.2f s",
            audio_seconds,
            compute,
            extra={
                "request_id": plan.request_id,
                "endpoint": plan.endpoint,
                "mode": request.mode.value,
                "voice": plan.saved_voice or request.voice,
                "audio_seconds": round(audio_seconds, 3),
                "real_time_factor": round(compute / audio_seconds, 3) if audio_seconds else None,
                "first_audio_seconds": round(first, 3) if first is not None else None,
                "stream": request.stream,
                "format": plan.format,
            },
        )
        if self.keep and self.kept:
            state.outputs.submit(plan.request_id, np.concatenate(self.kept), engine.sample_rate,
                                 plan.format, {
                "endpoint": plan.endpoint, "model": engine.model.name, "text": request.text,
                "voice": plan.saved_voice or request.voice, "mode": request.mode.value,
                "instruct": request.instruct, "speed": request.speed, "seed": request.seed,
                "real_time_factor": round(compute / audio_seconds, 4) if audio_seconds else None,
            })  # fmt: skip
        self.job.put(Summary(audio_seconds, compute, first))


def _start(state: ServerState, plan: Plan, accepted_at: float) -> Callable[[Job], None]:
    """Hand the request to the engine loop; cancelling the job removes its row there."""

    def submit(relay: _Relay, prompt: PromptSource) -> None:
        engine_job = state.engine.submit(plan.request, relay, prompt=prompt)
        relay.job.on_cancel(engine_job.cancel)

    def read_voice_then_submit(relay: _Relay) -> None:
        try:
            features = saved_features(state, plan.saved_voice)
            submit(relay, features)  # a request cancelled meanwhile leaves at the loop's next step
        except BaseException as exc:  # noqa: BLE001 - e.g. the storage is unavailable
            relay.job.finish(exc)

    def start(job: Job) -> None:
        relay = _Relay(state, plan, job, accepted_at)
        if plan.saved_voice is None:
            submit(relay, relay.prompt)
        else:  # its stored features are read off the engine loop
            state.storage_call(lambda: read_voice_then_submit(relay))

    return start


async def _cancel_on_disconnect(state: ServerState, request: Request, job: Job) -> None:
    """Wait for the client to go away (the body has been read already) and cancel the job."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            if not job.ended and not job.cancelled.is_set():
                state.metrics.count("cancelled_total")
                log.info(
                    "client went away, synthesis cancelled",
                    extra={"request_id": _request_id_of(request)},
                )
            job.cancel()
            return


def _went_away(watcher: asyncio.Task) -> bool:
    """Whether ``_cancel_on_disconnect`` saw the client go (and cancelled the job)."""
    return watcher.done() and not watcher.cancelled() and watcher.exception() is None


def _request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


class JobStreamingResponse(StreamingResponse):
    """A streamed response that always stops its job when the response ends, however it ends."""

    def __init__(
        self, content: AsyncIterator[bytes], job: Job, state: ServerState, **kwargs
    ) -> None:
        super().__init__(content, **kwargs)
        self.job, self.state = job, state

    async def __call__(self, scope, receive, send) -> None:
        gone = False  # the client went away: only then is an unfinished job its cancellation

        async def watched() -> dict:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        try:
            await super().__call__(scope, watched, send)
        except ClientDisconnect:  # (ASGI 2.4 servers: a send to a closed connection)
            gone = True
            raise
        except asyncio.CancelledError:
            # uvicorn cancels a request only when its shutdown time runs out (guard.py logs
            # that stream's end); Ray Serve cancels it when its client goes
            gone = bool(scope.get("state", {}).get(CANCEL_IS_DISCONNECT))
            raise
        finally:
            if gone and not self.job.ended and not self.job.cancelled.is_set():
                self.state.metrics.count("cancelled_total")
                log.info(
                    "client went away, synthesis cancelled",
                    extra={"request_id": self.headers.get("x-request-id")},
                )
            self.job.cancel()


def start_job(state: ServerState, plan: Plan) -> Job:
    loop = asyncio.get_running_loop()
    accepted_at = time.monotonic()
    # a streamed response's audio waits in the job for its client: its slot is held until read
    held = plan.transport != "whole"
    job = Job(loop, deadline=accepted_at + state.settings.request_timeout, held_until_read=held)
    try:
        state.scheduler.submit(job, _start(state, plan, accepted_at))
    except Overloaded as exc:
        state.metrics.count("rejected_total")
        raise overloaded(exc.retry_after) from None
    job.stop_at_deadline()
    return job


def _timeout_error(state: ServerState) -> ApiError:
    state.metrics.count("timeouts_total")
    return ApiError(
        504,
        f"synthesis took longer than the {state.settings.request_timeout:g} s "
        "limit and was stopped",
        "timeout_error",
        "timeout",
    )


async def _next_piece(state: ServerState, job: Job, plan: Plan) -> bytes | Summary:
    """The next bytes piece or Summary, with engine errors mapped to HTTP errors."""
    try:
        return await job.next()
    except JobTimeout:
        raise _timeout_error(state) from None
    except CosyVoiceError as exc:
        raise from_engine_error(
            exc, supported_modes(state.engine), route_fields(plan.endpoint)
        ) from None
    except (StopAsyncIteration, ApiError):
        raise
    except Exception as exc:
        log.error("synthesis failed", exc_info=exc, extra={"request_id": plan.request_id})
        raise ApiError(
            500,
            f"synthesis failed: {type(exc).__name__}: {exc}",
            "server_error",
            "synthesis_failed",
        ) from None


async def respond(state: ServerState, request: Request, plan: Plan) -> Response:
    engine = state.engine
    job = start_job(state, plan)
    rate = output_rate(plan.format, plan.out_rate or engine.sample_rate)
    headers = {"X-Request-Id": plan.request_id, "X-Sample-Rate": str(rate)}
    media = "text/event-stream" if plan.transport == "sse" else media_type(plan.format)
    if plan.transport != "sse":  # whole or streamed, the audio is a file to save by this name
        ext = "ogg" if plan.format == "opus" else plan.format
        headers["Content-Disposition"] = f'inline; filename="speech-{plan.request_id}.{ext}"'
    watcher = asyncio.create_task(_cancel_on_disconnect(state, request, job))
    try:
        first = await _next_piece(state, job, plan)  # errors before any audio -> JSON status
        if plan.transport == "whole":
            pieces, summary = [], None
            item = first
            while True:
                if isinstance(item, Summary):
                    summary = item
                else:
                    pieces.append(item)
                try:
                    item = await _next_piece(state, job, plan)
                except StopAsyncIteration:
                    break
            if summary is None:  # stopped early (deadline or shutdown): never a short 200
                if _went_away(watcher):
                    raise ClientGone
                raise (
                    _timeout_error(state)
                    if job.expired()
                    else ApiError(
                        503, "the synthesis was stopped before its end", "server_error", "stopped"
                    )
                )
            if summary is not None:
                headers["X-Audio-Duration"] = f"{summary.audio_seconds:.3f}"
                if summary.audio_seconds:
                    headers["X-Real-Time-Factor"] = (
                        f"{summary.compute_seconds / summary.audio_seconds:.3f}"
                    )
            return Response(b"".join(pieces), media_type=media, headers=headers)
    except StopAsyncIteration:
        if _went_away(watcher):  # its job cancelled: not a fault of the server's
            raise ClientGone from None
        raise ApiError(500, "synthesis produced nothing", "server_error", "no_audio") from None
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()
    if plan.transport == "sse":
        headers["Cache-Control"] = "no-cache"
        body = _sse_body(state, job, plan, first)
    else:
        body = _audio_body(state, job, plan, first)
    return JobStreamingResponse(body, job, state, media_type=media, headers=headers)


async def _audio_body(
    state: ServerState, job: Job, plan: Plan, first: bytes | Summary
) -> AsyncIterator[bytes]:
    item = first
    while True:
        if isinstance(item, bytes):
            yield item
        try:
            item = await _next_piece(state, job, plan)
        except StopAsyncIteration:
            if isinstance(item, Summary):  # the Summary comes last: the audio is complete
                return
            raise StreamTruncated("the synthesis stopped before its end") from None
        except ApiError as exc:  # headers are gone: abort the transfer (see StreamTruncated)
            raise StreamTruncated(exc.message) from None


async def _sse_body(
    state: ServerState, job: Job, plan: Plan, first: bytes | Summary
) -> AsyncIterator[bytes]:
    engine = state.engine
    item = first
    while True:
        if isinstance(item, bytes):
            yield sse_delta(item)
        elif isinstance(item, Summary):
            text = plan.request.text if isinstance(plan.request.text, str) else ""
            try:
                input_tokens = len(engine.tokenizer.encode(text))
            except Exception:  # noqa: BLE001 - usage is informative only
                input_tokens = len(text)
            output_tokens = seconds_to_tokens(
                item.audio_seconds, engine.model.config.token_frame_rate
            )
            yield sse_done(input_tokens, output_tokens)
        try:
            item = await _next_piece(state, job, plan)
        except StopAsyncIteration:
            if not isinstance(item, Summary):  # stopped before its end: say so, never a quiet end
                state.metrics.count("truncated_streams_total")
                error = ApiError(
                    504 if job.expired() else 503,
                    "the synthesis stopped before its end",
                    "server_error",
                    "truncated",
                )
                yield sse_event({"type": "error", "error": error.body()["error"]})
            return
        except ApiError as exc:
            state.metrics.count("truncated_streams_total")
            yield sse_event({"type": "error", "error": exc.body()["error"]})
            return
