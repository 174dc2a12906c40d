"""cosyvoice-lite: a slim, fast engine and server for the CosyVoice text-to-speech models.

Names are imported lazily so that light tools (the text frontend, the CLI's help) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "engine",
    "Voice": "engine",
    "synthesize_to_file": "engine",
    "iter_text": "engine",
    "share_threads": "onnx_threads",
    "AudioChunk": "request",
    "Mode": "request",
    "SynthesisRequest": "request",
    "Waveform": "request",
    "AudioError": "errors",
    "CosyVoiceError": "errors",
    "DeviceError": "errors",
    "EngineClosedError": "errors",
    "InvalidRequestError": "errors",
    "ModelDirError": "errors",
    "ModelDownloadError": "errors",
    "UnknownVoiceError": "errors",
    "UnsupportedModeError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cosyvoice_lite' has no attribute {name!r}")
