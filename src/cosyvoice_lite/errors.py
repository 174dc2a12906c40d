"""Exceptions raised by cosyvoice-lite. Every user-facing failure is one of these, with a message
that says what was wrong and what to do; serving maps them to HTTP statuses."""

from __future__ import annotations


class CosyVoiceError(Exception):
    """Base class for every error cosyvoice-lite raises on purpose."""


class ModelDirError(CosyVoiceError):
    """A model directory is missing files, has unreadable files or does not match its yaml."""


class ModelDownloadError(CosyVoiceError):
    """A model or asset could not be downloaded (usually: no network)."""


class DeviceError(CosyVoiceError):
    """The requested device or dtype is not available on this machine."""


class InvalidRequestError(CosyVoiceError):
    """A synthesis request is malformed: empty text, bad speed, bad markup, ...; ``param``
    names the request field at fault, where one is (a server names its own field for it)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedModeError(InvalidRequestError):
    """The loaded model cannot do the requested mode (e.g. instruct on -SFT)."""


class UnknownVoiceError(InvalidRequestError):
    """The requested preset or saved voice does not exist."""


class AudioError(InvalidRequestError):
    """Prompt or source audio is unreadable, silent, too short or too long."""


class ModelOutputError(CosyVoiceError, RuntimeError):
    """The model's output cannot be used (NaN or infinite samples or speech-token
    probabilities): its weights are damaged, or they overflow in the precision chosen for the
    device. The server's fault, not the request's."""


def non_finite_cause(dtype: str | None = None) -> str:
    """Why a model's output is NaN or infinite, in the same words wherever it is found (a
    ``ModelOutputError``'s message after what was found): ``dtype``, the weights' precision, or
    None where it is not known there."""
    precision = dtype or "the precision chosen"
    return f"its weights are damaged (cosyvoice-lite check) or overflow in {precision}"


class EngineClosedError(CosyVoiceError, RuntimeError):
    """The engine was closed (shutting down): the work did not run, or was cut off."""
