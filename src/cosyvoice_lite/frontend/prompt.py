"""Prompt audio -> the three things the networks need from it (no model weights involved).

* speech tokens: 16 kHz whisper log-mel through ``speech_tokenizer_v*.onnx``;
* speaker x-vector: 16 kHz kaldi fbank through ``campplus.onnx``;
* prompt mel: the flow's own mel extractor at the model's sample rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..audio.features import mel_spectrogram
from ..audio.io import (
    MAX_PROMPT_SECONDS,
    AudioSource,
    check_prompt_audio,
    load_audio,
    to_sample_rate,
)
from ..config import MelConfig
from ..errors import AudioError
from .speech import SpeakerEncoder, SpeechTokenizer

TOKENIZER_RATE = 16000


@dataclass(frozen=True)
class PromptFeatures:
    """Features of one prompt recording (CPU tensors; the official ``add_zero_shot_spk`` content).

    ``speech_tokens`` int32 [1, T], ``speech_feat`` float32 [1, T_mel, 80], ``embedding`` [1, 192].
    """

    speech_tokens: torch.Tensor
    speech_feat: torch.Tensor
    embedding: torch.Tensor
    prompt_text: str = ""
    prompt_tokens: torch.Tensor | None = None  # transcript tokens, when only those are stored

    def aligned(self, token_mel_ratio: int) -> PromptFeatures:
        """v2/v3: truncate so that prompt mel frames = ratio x prompt tokens (official alignment)."""
        n = min(self.speech_feat.shape[1] // token_mel_ratio, self.speech_tokens.shape[1])
        return PromptFeatures(
            self.speech_tokens[:, :n],
            self.speech_feat[:, : token_mel_ratio * n],
            self.embedding,
            self.prompt_text,
            self.prompt_tokens,
        )


class PromptEncoder:
    """Computes ``PromptFeatures`` with the two ONNX models of a model directory."""

    def __init__(self, campplus: Path, speech_tokenizer: Path, mel: MelConfig) -> None:
        self.speaker_encoder = SpeakerEncoder(campplus)
        self.speech_tokenizer = SpeechTokenizer(speech_tokenizer)
        self.mel = mel

    def load(
        self, source: AudioSource, what: str = "prompt audio", max_seconds: float | None = None
    ) -> tuple[torch.Tensor, int]:
        """Decode and check a prompt recording: readable, >= 16 kHz, not silent, within limits
        (``max_seconds``, at most and by default 30). ``what`` names it in errors (and their
        ``param``): prompt audio, source audio."""
        limit = MAX_PROMPT_SECONDS if max_seconds is None else min(max_seconds, MAX_PROMPT_SECONDS)
        try:
            wav, rate = load_audio(source, max_seconds=limit)  # capped as it decodes
            check_prompt_audio(wav, rate, max_seconds=limit)
        except AudioError as exc:
            raise AudioError(f"{what}: {exc}", what.replace(" ", "_")) from None
        return wav, rate

    def tokens(self, wav: torch.Tensor, rate: int, what: str = "source audio") -> torch.Tensor:
        """The speech tokens of a recording (voice conversion's source)."""
        return self._tokens(to_sample_rate(wav, rate, TOKENIZER_RATE), what)

    def _tokens(self, wav16k: torch.Tensor, what: str) -> torch.Tensor:
        try:
            return self.speech_tokenizer(wav16k)
        except AudioError as exc:  # named as load() names them
            raise AudioError(f"{what}: {exc}", what.replace(" ", "_")) from None

    def encode(
        self, source: AudioSource, prompt_text: str = "", max_seconds: float | None = None
    ) -> PromptFeatures:
        wav, rate = self.load(source, max_seconds=max_seconds)
        wav16k = to_sample_rate(wav, rate, TOKENIZER_RATE)
        # The mel is taken at the model's own rate. (The official HEAD loads every prompt at 24 kHz,
        # which for the 22.05 kHz v1 models analyses the audio at the wrong rate; we do not copy that.)
        wav_mel = to_sample_rate(wav, rate, self.mel.sampling_rate)
        feat = mel_spectrogram(
            wav_mel,
            self.mel.n_fft,
            self.mel.num_mels,
            self.mel.sampling_rate,
            self.mel.hop_size,
            self.mel.win_size,
            self.mel.fmin,
            self.mel.fmax,
            self.mel.center,
        )
        features = PromptFeatures(
            speech_tokens=self._tokens(wav16k, "prompt audio"),
            speech_feat=feat.squeeze(0).transpose(0, 1).unsqueeze(0).contiguous(),
            embedding=self.speaker_encoder(wav16k),
            prompt_text=prompt_text,
        )
        if not (
            torch.isfinite(features.speech_feat).all() and torch.isfinite(features.embedding).all()
        ):
            # finite samples, but so far outside [-1, 1] (~1e19) that their power overflows:
            # refused here, not stored as a voice that every later request would refuse
            peak = float(wav.abs().max())
            raise AudioError(
                f"prompt audio: its samples reach {peak:.3g}, far outside [-1, 1], and give no "
                "usable features; normalise the recording",
                "prompt_audio",
            )
        return features
