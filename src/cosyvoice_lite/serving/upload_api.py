"""``POST /tts/upload``: the simple API with the prompt in the request (multipart, as the official
server's ``prompt_wav`` + ``prompt_text``): zero-shot, cross-lingual, instruct (CosyVoice2/3) and
voice conversion without saving a voice first."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from .errors import ApiError, route_fields
from .forms import read_form
from .openai_api import error_responses
from .openapi import audio_response
from .prompts import PromptCache, check_audio, plan_prompted
from .schemas import MAX_SEED
from .synthesis import Plan, respond

TEXT_FIELDS = (
    "text",
    "prompt_text",
    "instruct",
    "speaker",
    "mode",
    "speed",
    "seed",
    "format",
    "stream",
)
FILE_FIELDS = ("prompt_wav", "source_wav")
FORMATS = ("wav", "mp3", "flac", "opus", "ogg", "pcm")
MODES = ("zero_shot", "cross_lingual", "instruct", "vc")

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "text": {
                            "type": "string",
                            "description": "text to speak (not needed for vc)",
                        },
                        "prompt_wav": {
                            "type": "string",
                            "format": "binary",
                            "description": "prompt recording (wav/flac/mp3/ogg, >= 16 kHz, 0.5-30 s)",
                        },
                        "prompt_text": {
                            "type": "string",
                            "description": "its transcript: zero-shot; without it: cross-lingual",
                        },
                        "instruct": {
                            "type": "string",
                            "description": "instruction (CosyVoice2/3): instruct mode",
                        },
                        "source_wav": {
                            "type": "string",
                            "format": "binary",
                            "description": "voice conversion: speech to re-speak in the prompt's voice "
                            "(or in the voice named by speaker)",
                        },
                        "speaker": {
                            "type": "string",
                            "description": "vc target voice instead of prompt_wav",
                        },
                        "mode": {
                            "type": "string",
                            "enum": list(MODES),
                            "description": "force the mode",
                        },
                        "speed": {"type": "number", "minimum": 0.5, "maximum": 2.0, "default": 1.0},
                        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                        "format": {"type": "string", "enum": list(FORMATS), "default": "wav"},
                        "stream": {"type": "boolean", "default": False},
                    },
                }
            }
        },
    }
}


def _number(form, name: str, kind, default, low, high):
    raw = form.fields.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ApiError(
            400, f"{name} must be a {kind.__name__}, got {raw!r}", code="invalid_field", param=name
        ) from None
    if not low <= value <= high:
        raise ApiError(
            400, f"{name} must be between {low:g} and {high:g}", code="invalid_field", param=name
        )
    return value


def _choice(form, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = form.fields.get(name, "").strip() or default
    if value is not None and value not in choices:
        raise ApiError(
            400,
            f"{name} must be one of {', '.join(choices)}, got {value!r}",
            code="invalid_field",
            param=name,
        )
    return value


def upload_router(state, prompts: PromptCache) -> APIRouter:
    router = APIRouter(tags=["simple API"])
    settings = state.settings

    @router.post(
        "/tts/upload",
        openapi_extra=UPLOAD_SCHEMA,
        responses={
            200: audio_response("the audio (wav unless format names another)"),
            **error_responses(400, 401, 404, 413, 415, 429, 503, 504),
        },
    )
    async def tts_upload(request: Request):
        """Speak with a prompt recording sent along (nothing is saved; the prompt's features are
        cached by content for a while, so repeating it costs nothing). ``prompt_wav`` +
        ``prompt_text``: zero-shot; ``prompt_wav`` alone: cross-lingual; + ``instruct``: instruct
        (CosyVoice2/3); ``source_wav`` + ``prompt_wav`` or ``speaker``: voice conversion."""
        state.require_engine()
        limit = settings.max_upload_bytes
        form = await read_form(request, limit, FILE_FIELDS, TEXT_FIELDS)
        prompt = form.files.get("prompt_wav")
        if prompt is not None:
            check_audio(prompt, "prompt_wav", limit, settings.max_prompt_seconds)
        source = form.files.get("source_wav")
        if source is not None:
            check_audio(source, "source_wav", limit, settings.max_prompt_seconds)
        fmt = _choice(form, "format", FORMATS, "wav")
        stream = _choice(form, "stream", ("true", "false", "1", "0"), "false") in ("true", "1")
        planned = await asyncio.to_thread(  # it may read the voice library's storage
            plan_prompted,
            state,
            prompts,
            text=form.fields.get("text", ""),
            prompt=prompt,
            prompt_field="prompt_wav",
            prompt_text=form.fields.get("prompt_text"),
            voice=form.fields.get("speaker", "").strip() or None,
            instruct=form.fields.get("instruct"),
            source=source,
            speed=_number(form, "speed", float, 1.0, 0.5, 2.0),
            seed=_number(form, "seed", int, None, 0, MAX_SEED),
            mode=_choice(form, "mode", MODES, None),
            engine_stream=stream,
            fields=route_fields("/tts/upload"),
        )
        request_id = request.scope.get("state", {}).get("request_id")
        plan = Plan(
            planned.request,
            planned.saved_voice,
            fmt,
            None,
            "stream" if stream else "whole",
            "/tts/upload",
            **({"request_id": request_id} if request_id else {}),
            prompt=planned.prompt,
        )
        return await respond(state, request, plan)

    return router
