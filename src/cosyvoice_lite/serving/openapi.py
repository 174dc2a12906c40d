"""The OpenAPI document as the server really behaves: every error status an operation can answer
(with the JSON error body, not FastAPI's validation schema) and the configured text limits.

    install_openapi(app, settings, public)   # once, after the routes are added

Statuses come from three places: the middleware (401 key where one is configured and the path is
not public: also declared as a bearer security scheme, so /docs has an Authorize button and
generated clients send the key; 408/413 body, 503 connection cap or model loading, 500 for a bug), the request (400/404/415/422 bad input) and the work (409 names,
429 queue, 504 timeout, 507 storage). Routes may document more themselves; nothing is removed.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import FastAPI

from ..audio.io import AUDIO_FORMATS
from .errors import ERROR_SCHEMA
from .settings import Settings
from .voices import MAX_NAME_BYTES, MAX_NAME_CHARS

DESCRIPTIONS = {
    400: "invalid request (message and param say what)",
    401: "missing or wrong API key",
    403: "a browser's request from another site's page, whose origin is not allowed",
    404: "unknown voice, model or path",
    408: "the request body stopped arriving",
    409: "the name is taken",
    413: "request body too large",
    415: "unsupported media type or audio format",
    422: "the body does not match the schema",
    429: "queue full (see Retry-After)",
    500: "server fault (e.g. damaged stored data); the message names no paths",
    503: "model loading, voice storage unavailable, or too many connections",
    504: "the request took longer than the server's timeout",
    507: "the voice storage is full",
}
EVERY = (401, 413, 500, 503)
WITH_INPUT = (400, 404, 408, 415)  # operations with a body or parameters
BY_METHOD = {"post": (403, 409, 429, 504, 507), "delete": (403, 404, 507)}
TEXT_FIELDS = {  # property name -> Settings attribute with its limit
    "text": "max_text_chars",
    "input": "max_text_chars",
    "instruct": "max_instruct_chars",
    "instructions": "max_instruct_chars",
    "prompt_text": "max_prompt_text_chars",
    "ref_text": "max_prompt_text_chars",
    "transcript": "max_prompt_text_chars",
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}
NAME_RULES = (
    f"Voice name: 1-{MAX_NAME_CHARS} letters, digits, spaces, '.', '-' or '_' (at most "
    f"{MAX_NAME_BYTES} bytes in UTF-8) with a letter or digit among them, starting with a "
    "letter, digit or '_' and not ending with a space or '.', not mixing Latin, Cyrillic or Greek letters; normalised to Unicode NFKC and "
    "unique without regard to case."
)


def audio_response(description: str, *extra_types: str) -> dict:
    """The 200 entry of a route that answers with audio in any of the formats (``extra_types``:
    what else it may send, e.g. ``text/event-stream``)."""
    types = dict.fromkeys([kind for _, _, kind in AUDIO_FORMATS.values()] + list(extra_types))
    return {"description": description, "content": {kind: {} for kind in types}}


def _error_response(status: int) -> dict:
    return {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }


def _limit_properties(schema: dict, settings: Settings) -> None:
    for name, prop in schema.get("properties", {}).items():
        limit = TEXT_FIELDS.get(name)
        if limit is not None:
            for option in prop.get("anyOf", [prop]):
                if option.get("type") == "string":
                    option["maxLength"] = getattr(settings, limit)
        elif name == "name" and prop.get("type") == "string":
            prop["maxLength"] = MAX_NAME_CHARS
            prop.setdefault("description", NAME_RULES)


def _audio_only(responses: dict) -> None:
    """FastAPI adds a JSON 200 to every route; an audio route never sends one."""
    content = responses.get("200", {}).get("content", {})
    if any(kind.startswith("audio/") for kind in content):
        content.pop("application/json", None)


def document(
    schema: dict[str, Any], settings: Settings, public: Collection[str] = ()
) -> dict[str, Any]:
    """Complete ``schema`` in place (see module doc) and return it. ``public``: the paths that
    answer without the API key."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for body in components["schemas"].values():
        _limit_properties(body, settings)
    if settings.api_key:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearerAuth": []}]
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            statuses = set(EVERY) | set(BY_METHOD.get(method, ()))
            keyed = bool(settings.api_key) and path not in public
            if not keyed:
                statuses.discard(401)
                operation.get("responses", {}).pop("401", None)
                if settings.api_key:
                    operation["security"] = []  # public: no key needed
            if operation.get("requestBody") or operation.get("parameters"):
                statuses |= set(WITH_INPUT)
            responses = operation.setdefault("responses", {})
            _audio_only(responses)
            # 422 only where a JSON body is checked against its schema outside /v1 (the /v1
            # routes answer 400, as OpenAI; forms and paths are checked by the routes: 400)
            json_body = "application/json" in operation.get("requestBody", {}).get("content", {})
            if json_body and not path.startswith("/v1/"):
                statuses.add(422)
            else:
                responses.pop("422", None)
            for status in sorted(statuses):
                entry = responses.get(str(status))
                if entry is None or status == 422:  # FastAPI's 422 body is not ours
                    responses[str(status)] = _error_response(status)
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter.setdefault("description", NAME_RULES)
            for content in operation.get("requestBody", {}).get("content", {}).values():
                if "properties" in content.get("schema", {}):
                    _limit_properties(content["schema"], settings)
    return schema


def install_openapi(app: FastAPI, settings: Settings, public: Collection[str] = ()) -> None:
    """Make ``app.openapi()`` return the completed document (built once, then cached)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(build(), settings, public)
        return app.openapi_schema

    app.openapi = openapi
