"""Output files: audio formats by extension, and writes that appear whole or not at all. Light
(no torch at import): the CLI's option checks use it before anything loads."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

EXTENSIONS = {".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".ogg": "ogg", ".opus": "opus"}
"""The audio format an output file's extension names."""


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` written beside ``path`` under a name of its own, then renamed over it. (The
    temporary name does not match "*.json" globs of readers waiting for a result.)"""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
