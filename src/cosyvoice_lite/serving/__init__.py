"""HTTP serving: the FastAPI app (simple /tts API, OpenAI speech API, voice library, metrics,
web page) and the ``serve`` command."""

from __future__ import annotations

import importlib
from typing import Any

# Imported lazily: the CLI builds its `serve` parser from serving.cli without loading the server.
_EXPORTS = {"create_app": "app", "Settings": "settings", "S3Settings": "settings"}

__all__ = ["create_app", "Settings", "S3Settings"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
