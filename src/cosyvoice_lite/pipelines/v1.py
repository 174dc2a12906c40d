"""CosyVoice v1 token -> waveform, streaming and not, with the official chunking and cross-fades.

All streaming state lives in a ``V1Stream`` object owned by one request; the networks are shared and
stateless, so concurrent requests never see each other's caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..decoding import OFFICIAL_LENGTHS, LengthPolicy, Task
from .common import ModelInputs, decoding_task, fade_in_out, run_task_alone

TOKEN_OVERLAP = 20  # tokens shared by consecutive streaming chunks
MEL_CACHE = 20  # mel frames of look-back given to the vocoder
HOP_LENGTH = 256  # vocoder samples per mel frame (22.05 kHz)


@dataclass
class V1Stream:
    """Per-request streaming caches (the official keeps these in dicts keyed by a uuid)."""

    flow_cache: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 80, 0, 2))
    mel_overlap: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 80, 0))
    hift_mel: torch.Tensor | None = None
    hift_source: torch.Tensor | None = None
    hift_speech: torch.Tensor | None = None


class V1Segment:
    """One segment's tokens -> waveform: the official chunking (a fixed hop plus 20 overlap tokens
    when streaming; everything at the end otherwise) with per-request caches."""

    def __init__(self, pipeline: V1Pipeline, inputs: ModelInputs, generator: torch.Generator,
                 stream: bool, speed: float) -> None:
        self.pipeline, self.inputs, self.generator = pipeline, inputs, generator
        self.stream, self.speed = stream, speed
        self.state = V1Stream()
        self.pending: list[int] = []

    def push(self, token: int) -> torch.Tensor | None:
        """Add a token; returns a waveform piece when a streaming chunk is complete."""
        self.pending.append(token)
        hop = self.pipeline.min_hop
        if not self.stream or len(self.pending) < hop + TOKEN_OVERLAP:
            return None
        chunk = self.pending[: hop + TOKEN_OVERLAP]
        self.pending = self.pending[hop:]
        return self.pipeline._token2wav(self.state, chunk, self.inputs, self.generator, False)

    def finish(self) -> torch.Tensor:
        """The last piece, from the tokens not yet turned into audio."""
        return self.pipeline._token2wav(self.state, self.pending, self.inputs, self.generator,
                                        True, self.speed)


class V1Pipeline:
    """LLM tokens -> flow mel -> HiFT waveform for CosyVoice-300M models."""

    def __init__(self, llm: torch.nn.Module, flow: torch.nn.Module, hift: torch.nn.Module,
                 frame_rate: int, sample_rate: int,
                 compute: Callable[[], AbstractContextManager]) -> None:
        self.llm, self.flow, self.hift = llm, flow, hift
        self.sample_rate = sample_rate
        self.compute = compute  # makes the autocast context for the LLM and flow (no-op in fp32)
        self.min_hop = 2 * frame_rate  # official token_min_hop_len; the hop never grows (scale 1)
        self.mel_overlap_len = int(TOKEN_OVERLAP / frame_rate * sample_rate / HOP_LENGTH)
        self.mel_window = torch.from_numpy(np.hamming(2 * self.mel_overlap_len))
        self.source_cache_len = MEL_CACHE * HOP_LENGTH
        self.speech_window = torch.from_numpy(np.hamming(2 * self.source_cache_len))

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    def task(self, inputs: ModelInputs, sampler, policy: LengthPolicy = OFFICIAL_LENGTHS) -> Task:
        """The decoding task of one segment (the engine loop steps it with other requests')."""
        return decoding_task(self.llm, inputs, sampler, policy)

    def speech_tokens(self, inputs: ModelInputs, sampler,
                      policy: LengthPolicy = OFFICIAL_LENGTHS) -> Iterator[int]:
        """One segment's speech tokens, decoded alone (a batch of one)."""
        return run_task_alone(self.llm, self.task(inputs, sampler, policy), self.compute)

    def start(self, inputs: ModelInputs, generator: torch.Generator, stream: bool,
              speed: float = 1.0) -> V1Segment:
        """The token -> waveform state of one segment; push tokens in, pieces come out."""
        return V1Segment(self, inputs, generator, stream, speed)

    def synthesize(self, inputs: ModelInputs, sampler, generator: torch.Generator,
                   stream: bool, speed: float = 1.0) -> Iterator[torch.Tensor]:
        """Waveform pieces [1, N] of one segment, computed alone."""
        segment = self.start(inputs, generator, stream, speed)
        for token in self.speech_tokens(inputs, sampler):
            piece = segment.push(token)
            if piece is not None:
                yield piece
        yield segment.finish()

    @torch.inference_mode()
    def _token2wav(self, state: V1Stream, tokens: list[int], inputs: ModelInputs,
                   generator: torch.Generator, finalize: bool, speed: float = 1.0) -> torch.Tensor:
        device = self.device
        token = torch.tensor([tokens], dtype=torch.int32, device=device)
        with self.compute():
            mel, state.flow_cache = self.flow.inference(
                token=token,
                token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
                prompt_token=inputs.flow_prompt_speech_token,
                prompt_token_len=torch.tensor([inputs.flow_prompt_speech_token.shape[1]],
                                              dtype=torch.int32, device=device),
                prompt_feat=inputs.prompt_speech_feat,
                prompt_feat_len=torch.tensor([inputs.prompt_speech_feat.shape[1]],
                                             dtype=torch.int32, device=device),
                embedding=inputs.flow_embedding,
                flow_cache=state.flow_cache,
                generator=generator,
            )
        mel = mel.float()
        if state.mel_overlap.shape[2] != 0:
            mel = fade_in_out(mel, state.mel_overlap, self.mel_window)
        if state.hift_mel is not None:
            mel = torch.concat([state.hift_mel, mel], dim=2)
            cache_source = state.hift_source
        else:
            cache_source = torch.zeros(1, 1, 0, device=mel.device)
        if not finalize:
            state.mel_overlap = mel[:, :, -self.mel_overlap_len:]
            mel = mel[:, :, : -self.mel_overlap_len]
        elif speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, source = self.hift.inference(speech_feat=mel, cache_source=cache_source,
                                             generator=generator)
        if state.hift_speech is not None:
            speech = fade_in_out(speech, state.hift_speech, self.speech_window)
        if not finalize:
            state.hift_mel = mel[:, :, -MEL_CACHE:]
            state.hift_source = source[:, :, -self.source_cache_len:]
            state.hift_speech = speech[:, -self.source_cache_len:]
            speech = speech[:, : -self.source_cache_len]
        return speech
