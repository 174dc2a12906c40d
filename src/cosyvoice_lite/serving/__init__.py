"""HTTP serving: the FastAPI app (simple /tts API, OpenAI speech API, voice library, metrics,
web page) and the ``serve`` command."""

from __future__ import annotations

from .app import create_app
from .settings import S3Settings, Settings

__all__ = ["create_app", "Settings", "S3Settings"]

