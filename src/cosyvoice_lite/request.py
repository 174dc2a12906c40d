"""The synthesis request and the audio chunks that come back. Plain data, no behaviour."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cosyvoice_lite.audio.waveform import Waveform

# a path, encoded bytes, a binary file, or samples already decoded (``audio.io.load_audio``)
AudioSource = str | Path | bytes | BinaryIO | Waveform


class Mode(str, Enum):
    """What the request asks for; which ones a model supports depends on its version and release."""

    PRESET = "preset"  # a built-in voice from spk2info.pt (official inference_sft)
    ZERO_SHOT = "zero_shot"  # clone a prompt: audio + its transcript
    CROSS_LINGUAL = "cross_lingual"  # clone a prompt's voice, no transcript (other language)
    INSTRUCT = "instruct"  # natural-language control (v1: preset voice; v2/v3: prompt voice)
    VOICE_CONVERSION = "vc"  # re-speak source audio in the prompt's voice


MIN_SPEED, MAX_SPEED = 0.5, 2.0  # the models' range (the official's examples stay in it)
# ``text`` is split into segments of the model's length; an instruction and a prompt's transcript
# are not, they enter every segment's prompt whole: bounded, so that a request's prefill is.
# (A 30 s prompt's transcript is a few hundred characters; the server's defaults are lower.)
MAX_INSTRUCT_CHARS = MAX_PROMPT_TEXT_CHARS = 4096
MAX_PROMPT_SECONDS = 30.0
"""The official speech-token extraction asserts on prompts longer than 30 s (the S3 tokenizer is
a whisper-style encoder trained on windows of at most 30 s)."""
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


@dataclass(frozen=True)
class SynthesisRequest:
    """One synthesis job. ``text`` may be an iterable of text pieces (streaming text in, v2/v3).

    ``voice`` names a preset voice or a cloned voice stored with the model (its spk2info.pt); a
    cloned voice stands in for ``prompt_audio`` + ``prompt_text`` in the modes that clone a
    prompt. A server's saved voices are prompt features: ``Engine.synthesize(request,
    prompt=features)``.
    """

    mode: Mode
    text: str | Iterable[str] = ""
    voice: str | None = None
    prompt_audio: AudioSource | None = None
    prompt_text: str | None = None
    instruct: str | None = None
    source_audio: AudioSource | None = None
    speed: float = 1.0
    seed: int | None = None
    stream: bool = False
    text_frontend: bool = True
    # Length control per text segment (as vLLM's ignore_eos / max_tokens): benchmarks with random
    # weights fix the speech length with both; ``max_speech_tokens`` alone caps a segment's work.
    max_speech_tokens: int | None = None
    ignore_eos: bool = False
    # the longest prompt or source recording taken, in seconds, checked as it is decoded (a
    # server's limit; at most and by default 30, the speech tokenizer's window)
    max_audio_seconds: float | None = None


@dataclass(frozen=True)
class AudioChunk:
    """A piece of the output waveform: float32 mono samples at ``sample_rate``, nominally in
    [-1, 1] (as the official's, a streamed v1/v2 cross-fade can pass it by a few percent: clip
    before converting to integers, as the CLI and the server do)."""

    samples: np.ndarray
    sample_rate: int
    segment: int = 0  # index of the text segment this audio belongs to
    final: bool = False  # the last chunk of the whole request
    text: str = ""  # the normalised text segment being spoken
    info: dict = field(default_factory=dict)  # e.g. token counts, timings

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate
