"""HTTP errors: every failure becomes an OpenAI-style JSON body with the right status.

{"error": {"message": "...", "type": "invalid_request_error", "param": "voice", "code": "..."}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import (
    AudioError,
    CosyVoiceError,
    EngineClosedError,
    InvalidRequestError,
    ModelOutputError,
    UnknownVoiceError,
    UnsupportedModeError,
)
from .voices import InvalidVoiceNameError, StorageError, VoiceDamagedError

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
"""The JSON body of every error response (OpenAPI / JSON Schema)."""


class ClientGone(Exception):
    """The client went away before its response (closed while its body was being read, or
    while its audio was being made): nothing is sent, and the request is recorded as
    ``CLIENT_CLOSED`` (nginx's 499), not as a server or request error."""


CLIENT_CLOSED = 499


# Statuses a retry of the same request would meet again (a name taken, a synthesis past the
# time limit, a full disk, the server's own fault); an error with Retry-After invites one.
NOT_RETRIED = frozenset({409, 500, 504, 507})


class ApiError(Exception):
    """An error with its HTTP status, raised anywhere in the serving layer."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        if status in NOT_RETRIED and "Retry-After" not in self.headers:
            # OpenAI's generated SDKs (Python, Node, Go, ...) send a 409/5xx request twice more
            # unless told not to: a synthesis that ran out of time would run three times
            self.headers.setdefault("x-should-retry", "false")
        self.extra = extra

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        error.update(self.extra)
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(
    exc: CosyVoiceError,
    supported_modes: list[str] | None = None,
    fields: Mapping[str, str] | None = None,
) -> ApiError:
    """Map the engine's exception classes to statuses (bad input is never a 500; stored data
    that is damaged or storage that fails is the server's fault, never the client's). ``fields``:
    the route's names for the request fields an error names (``route_fields``)."""
    if isinstance(exc, StorageError):
        kind = "insufficient_storage" if exc.status == 507 else "storage_unavailable"
        retry = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return ApiError(exc.status, str(exc), "server_error", kind, headers=retry)
    if isinstance(exc, EngineClosedError):
        return ApiError(503, str(exc), "server_error", "shutting_down")
    if isinstance(exc, ModelOutputError):
        return ApiError(500, str(exc), "server_error", "non_finite_audio")
    if isinstance(exc, VoiceDamagedError):
        return ApiError(500, str(exc), "server_error", "voice_damaged", "voice")
    if isinstance(exc, UnknownVoiceError):
        return ApiError(
            404, str(exc), "not_found_error", "voice_not_found", field_name(fields, "voice")
        )
    if isinstance(exc, UnsupportedModeError):
        return ApiError(
            400,
            str(exc),
            code="unsupported_mode",
            param="mode",
            supported_modes=supported_modes or [],
        )
    if isinstance(exc, InvalidVoiceNameError):
        return ApiError(400, str(exc), code="invalid_name", param="name")
    param = getattr(exc, "param", None)
    param = None if param is None else field_name(fields, param)
    if isinstance(exc, AudioError):
        return ApiError(400, str(exc), code="invalid_audio", param=param or "audio")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), code="invalid_request", param=param)
    return ApiError(500, str(exc), "server_error", "engine_error")  # (not the request's fault)


# The request fields as each API names them, where it differs from the engine's
# (SynthesisRequest's) names.
_ROUTE_FIELDS = {
    "/v1/audio/voices": {"prompt_audio": "audio_sample", "voice": "name"},
    "/voices": {"prompt_audio": "audio", "voice": "name"},
    "/v1/": {"text": "input", "instruct": "instructions", "prompt_audio": "ref_audio",
             "prompt_text": "ref_text", "source_audio": "source_audio"},
    "/tts/upload": {"prompt_audio": "prompt_wav", "source_audio": "source_wav", "voice": "speaker"},
    "/tts": {"voice": "speaker"},
}  # fmt: skip


def field_name(fields: Mapping[str, str] | None, name: str) -> str:
    """The route's name (``fields``, from ``route_fields``) for the engine's request field."""
    return (fields or {}).get(name, name)


def route_fields(path: str) -> Mapping[str, str]:
    """The engine's request field names -> those of the API at ``path``."""
    return next((f for prefix, f in _ROUTE_FIELDS.items() if path.startswith(prefix)), {})


def overloaded(retry_after: int) -> ApiError:
    return ApiError(
        429,
        f"the server is busy (queue full); retry in about {retry_after} s",
        "rate_limit_error",
        "queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def not_ready(state: str, detail: str = "") -> ApiError:
    if state == "failed":
        return ApiError(503, f"the model failed to load: {detail}", "server_error", "model_failed")
    return ApiError(
        503,
        "the model is still loading; retry shortly",
        "server_error",
        "model_loading",
        headers={"Retry-After": "2"},
    )
