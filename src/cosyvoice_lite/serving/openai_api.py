"""The OpenAI conventions: ``/v1/audio/speech`` (with the vLLM-Omni ``ref_audio``/``ref_text``
extension for one-off prompts), ``/v1/audio/voices`` (list, create, delete), ``/v1/models`` and
OpenAI's default voice names mapped onto this model's voices."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from ..errors import UnknownVoiceError
from .errors import ApiError, route_fields
from .guard import MAX_NAME_FIELD_CHARS, check_text, check_texts
from .openapi import audio_response
from .prompts import PromptCache, check_audio, decode_audio_field, plan_prompted
from .schemas import OPENAI_FORMATS, SpeechRequest
from .synthesis import Plan, model_voices, plan_request, preset_voices, respond
from .voice_create import read_voice_upload, save_voice
from .voices import NAMES_SHOWN, unknown_voice, validate_name

if TYPE_CHECKING:
    from ..engine import Engine

MODEL_ALIASES = ("cosyvoice-lite", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's dated snapshots of its speech models (gpt-4o-mini-tts-2025-12-15, tts-1-1106,
# tts-1-hd-1106) name them too
_SNAPSHOT = re.compile(r"(?:tts-1(?:-hd)?|gpt-4o-mini-tts)-(?:\d{4}-\d{2}-\d{2}|\d{4})")
# formats whose header states the length: whole files unless the client asks for a stream
WHOLE_FORMATS = ("wav", "flac")


def served(engine: Engine, model: str) -> bool:
    """Whether ``model`` names the served model (its own name, an alias, a snapshot's name)."""
    return model == engine.model.name or model in MODEL_ALIASES or bool(_SNAPSHOT.fullmatch(model))


OPENAI_PCM_RATE = 24000  # OpenAI's pcm is 24 kHz 16-bit mono, whatever the model's rate
# OpenAI's built-in voices, and whether they sound female: the default mapping picks a preset of
# the same kind where the model's preset names say so (the v1 -SFT voices: 英文女, 中文男, ...).
OPENAI_VOICES = {
    "alloy": True,
    "ash": False,
    "ballad": False,
    "coral": True,
    "echo": False,
    "fable": False,
    "nova": True,
    "onyx": False,
    "sage": True,
    "shimmer": True,
    "verse": False,
    "marin": True,
    "cedar": False,
}
PREFERRED = {True: ("英文女", "中文女"), False: ("英文男", "中文男")}

ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def error_responses(*statuses: int) -> dict:
    """OpenAPI entries for the JSON errors a route answers with."""
    what = {
        400: "invalid request",
        401: "missing or wrong API key",
        404: "unknown model or voice",
        409: "name taken",
        413: "upload too large",
        415: "not audio / wrong content type",
        422: "body does not match the schema",
        429: "queue full (Retry-After)",
        503: "model not loaded yet",
        504: "timeout",
    }
    return {
        s: {"description": what[s], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for s in statuses
    }


def default_voice_map(engine: Engine) -> dict[str, str]:
    """OpenAI voice name -> a preset of this model (empty when the model has no presets)."""
    presets = preset_voices(engine)
    if not presets:
        return {}
    mapping = {}
    for name, female in OPENAI_VOICES.items():
        mapping[name] = next((p for p in PREFERRED[female] if p in presets), presets[0])
    return mapping


def voice_aliases(state) -> dict[str, str]:
    """The effective alias table: configured aliases over the default mapping."""
    return {**default_voice_map(state.engine), **state.settings.voice_aliases}


def resolve_voice(state, voice: str) -> str:
    """A voice name as sent by a client -> a preset or saved voice of this server."""
    engine = state.engine
    if voice in engine.presets:
        return voice
    # aliases before the library (no saved voice takes a preset's or an alias's name): the
    # usual names never wait on the voice storage
    target = voice_aliases(state).get(voice)
    if target is not None:
        return target
    if state.library.exists(voice):
        return voice
    if voice in OPENAI_VOICES:
        saved = state.library.listed_names()
        raise UnknownVoiceError(
            f"voice {voice!r} is an OpenAI default name and {engine.model.name} has no preset "
            f"voice to map it to; use a saved voice ({', '.join(saved[:NAMES_SHOWN]) or 'none saved yet'}), "
            "send ref_audio (+ ref_text), or map it with --voice-alias "
            f"{voice}=NAME"
        )
    raise unknown_voice(voice, engine.voices() + state.library.listed_names())


def _model_not_found(engine: Engine, model: str) -> ApiError:
    return ApiError(
        404,
        f"model {model!r} is not served here; use {engine.model.name!r} "
        f"(or one of {', '.join(MODEL_ALIASES)})",
        "not_found_error",
        "model_not_found",
        "model",
    )


def openai_router(state, prompts: PromptCache) -> APIRouter:
    router = APIRouter(tags=["OpenAI API"])
    settings = state.settings

    @router.get("/v1/models", responses=error_responses(401, 503))
    async def models():
        """The served model under its own name and every alias ``model`` accepts."""
        engine = state.require_engine()
        names = (engine.model.name, *MODEL_ALIASES)
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "cosyvoice-lite",
                    "root": engine.model.name,
                }
                for name in names
            ],
        }

    @router.get("/v1/models/{model}", responses=error_responses(401, 404, 503))
    async def model(model: str):
        check_text("model", model, MAX_NAME_FIELD_CHARS)  # (not echoed back in a 404)
        engine = state.require_engine()
        if not served(engine, model):
            raise _model_not_found(engine, model)
        return {
            "id": model,
            "object": "model",
            "created": int(state.started),
            "owned_by": "cosyvoice-lite",
            "root": engine.model.name,
        }

    @router.post(
        "/v1/audio/speech",
        responses={
            200: audio_response(
                "the audio: mp3, opus and pcm sent segment by segment as it is made, wav and "
                "flac whole (their headers state the length) unless stream (then the length "
                "is unknown: libsndfile cannot read a streamed flac); stream_format sse: events",
                "text/event-stream",
            ),
            **error_responses(400, 401, 404, 413, 415, 429, 503, 504),
        },
    )
    async def speech(body: SpeechRequest, request: Request):
        """OpenAI-compatible speech. ``voice`` names a preset or saved voice (OpenAI's names map
        to presets); ``instructions`` is the style instruction; ``stream_format=sse`` sends
        speech.audio.delta events. Extensions: ``ref_audio`` + ``ref_text`` clone a one-off prompt
        (zero-shot; cross-lingual without ref_text; with ``instructions`` on CosyVoice2/3),
        ``source_audio`` converts speech into the voice of ``ref_audio`` or ``voice``."""
        check_text("model", body.model, MAX_NAME_FIELD_CHARS)  # (not echoed back in a 404)
        engine = state.require_engine()
        if not served(engine, body.model):
            raise _model_not_found(engine, body.model)
        if body.response_format not in OPENAI_FORMATS:
            raise ApiError(
                400,
                f"response_format {body.response_format!r} is not supported; use one "
                f"of {', '.join(OPENAI_FORMATS)}",
                code="unsupported_format",
                param="response_format",
            )
        voice = body.voice if isinstance(body.voice, str) or body.voice is None else body.voice.id
        check_texts(settings, input=body.input, instructions=body.instructions, voice=voice)
        check_text("ref_text", body.ref_text, settings.max_prompt_text_chars)
        if (body.ref_text or "").strip() and body.ref_audio is None:
            raise ApiError(  # it would be dropped: the client believes it cloned a voice
                400,
                "ref_text is the transcript of ref_audio: send ref_audio with it",
                code="invalid_request",
                param="ref_text",
            )
        sse = body.stream_format == "sse"
        engine_stream = body.stream if body.stream is not None else sse
        limit = settings.max_upload_bytes
        saved, provider = None, None
        if body.ref_audio is not None or body.source_audio is not None:
            prompt = source = None
            if body.ref_audio is not None:
                prompt = decode_audio_field(body.ref_audio, "ref_audio", limit)
            if body.source_audio is not None:
                source = check_audio(
                    decode_audio_field(body.source_audio, "source_audio", limit),
                    "source_audio",
                    limit,
                    settings.max_prompt_seconds,
                )
            # with ref_audio, voice is ignored (OpenAI clients always send one)
            target = None
            if voice and prompt is None:  # the library reads its storage: off the event loop
                target = await asyncio.to_thread(resolve_voice, state, voice)
            planned = await asyncio.to_thread(
                plan_prompted,
                state,
                prompts,
                text=body.input,
                prompt=prompt,
                prompt_field="ref_audio",
                prompt_text=body.ref_text,
                voice=target,
                instruct=body.instructions,
                source=source,
                speed=body.speed,
                seed=body.seed,
                mode=None,
                engine_stream=engine_stream,
                fields=route_fields("/v1/"),
            )
            synthesis, saved, provider = planned.request, planned.saved_voice, planned.prompt
        else:
            if not voice:
                raise ApiError(
                    400,
                    "voice is required (or ref_audio for a one-off prompt)",
                    code="missing_field",
                    param="voice",
                )
            synthesis, saved = await asyncio.to_thread(
                plan_request,
                state,
                text=body.input,
                voice=await asyncio.to_thread(resolve_voice, state, voice),
                instruct=body.instructions,
                speed=body.speed,
                seed=body.seed,
                mode=None,
                engine_stream=engine_stream,
                fields=route_fields("/v1/"),
            )
        out_rate = OPENAI_PCM_RATE if body.response_format == "pcm" else None
        whole = body.stream is not True and body.response_format in WHOLE_FORMATS
        request_id = request.scope.get("state", {}).get("request_id")
        plan = Plan(
            synthesis,
            saved,
            body.response_format,
            out_rate,
            # a stream's wav/flac header cannot state the length (libsndfile then fails to
            # read a flac back): whole files unless a stream was asked for
            "sse" if sse else ("whole" if whole else "stream"),
            "/v1/audio/speech",
            **({"request_id": request_id} if request_id else {}),
            prompt=provider,
        )
        return await respond(state, request, plan)

    @router.get("/v1/audio/voices", tags=["voice library"], responses=error_responses(401, 503))
    def list_voices():  # a plain function, off the event loop: the library reads its storage
        """Every voice ``voice`` accepts: the model's own (``preset`` or ``cloned``), saved voices,
        and the OpenAI names mapped to them (``kind: alias`` with its ``target``)."""
        engine = state.require_engine()
        data = [{"id": v["name"], "object": "audio.voice", **v} for v in model_voices(engine)]
        data += [v.to_api() for v in state.library.list()]
        data += [
            {"id": alias, "name": alias, "object": "audio.voice", "kind": "alias", "target": target}
            for alias, target in sorted(voice_aliases(state).items())
        ]
        # "voices": the same list where Kokoro-FastAPI-style clients look for it
        return {"object": "list", "data": data, "voices": data}

    upload_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["name", "audio_sample"],
                        "properties": {
                            "name": {"type": "string"},
                            "audio_sample": {
                                "type": "string",
                                "format": "binary",
                                "description": "the recording (also accepted as 'audio' or 'file')",
                            },
                            "prompt_text": {
                                "type": "string",
                                "description": "its transcript (also 'transcript' "
                                "or 'text'); without one the voice is used cross-lingually",
                            },
                        },
                    }
                }
            },
        }
    }

    @router.post(
        "/v1/audio/voices",
        status_code=201,
        tags=["voice library"],
        openapi_extra=upload_schema,
        responses=error_responses(400, 401, 409, 413, 415, 429, 503, 504),
    )
    async def create_voice(request: Request):
        """Create a custom voice (OpenAI custom voices, faster-cosyvoice): a name, an audio sample
        and its transcript. Stored in the voice library like ``POST /voices``."""
        state.require_engine()  # 503 while the model loads (its voices name the aliases)
        upload = await read_voice_upload(
            request,
            settings,
            ("audio_sample", "audio", "file"),
            ("prompt_text", "transcript", "text"),
            # consent, model and script_hint (OpenAI's client sends them) change nothing here
            ("consent", "type", "model", "script_hint"),
            check_fields=_check_voice_type,
        )
        return await save_voice(state, upload, reserved=voice_aliases(state))

    @router.delete(
        "/v1/audio/voices/{name}",
        tags=["voice library"],
        responses=error_responses(400, 401, 404, 409),
    )
    def delete_voice(name: str):
        """Delete a saved voice (presets and aliases cannot be deleted)."""
        engine = state.require_engine()
        if name in engine.presets or (
            name in voice_aliases(state) and not state.library.exists(name)
        ):
            raise ApiError(
                409,
                f"{name!r} is a preset voice or alias of this model and cannot be deleted",
                code="voice_is_preset",
                param="name",
            )
        state.library.delete(validate_name(name))
        return {"id": name, "object": "audio.voice.deleted", "deleted": True}

    return router


def _check_voice_type(fields: dict[str, str]) -> None:
    if fields.get("type", "audio_sample") != "audio_sample":
        raise ApiError(
            400,
            f"voices of type {fields['type']!r} are not made here; send type audio_sample with "
            "the recording",
            code="invalid_field",
            param="type",
        )
