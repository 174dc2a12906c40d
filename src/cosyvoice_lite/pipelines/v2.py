"""CosyVoice2 / CosyVoice3 token -> waveform, streaming and not.

Chunking follows the official ``CosyVoice2Model.tts``: the first chunk is flowed once
``25 + prompt pad`` tokens plus the 3-token look-ahead exist (the pad makes prompt + first hop a
multiple of the 25-token training chunk), later hops double up to 100. Unlike the official, the hop
progression starts afresh for every request (the official mutates it on the shared model) and all
state lives in ``_Stream`` objects owned by one request.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..decoding import OFFICIAL_LENGTHS, LengthPolicy, Task, drop_long_silences
from ..versions import spec
from .common import ModelInputs, decoding_task, run_task_alone

TOKEN_HOP = 25  # training chunk size: the first hop
MAX_TOKEN_HOP = 100
HOP_GROWTH = 2
V2_MEL_CACHE = 8  # vocoder look-back (mel frames) for the v2 HiFT cross-fade


@dataclass
class _Stream:
    """Per-request state: tokens so far, the flow offset and the vocoder caches."""

    tokens: list[int] = field(default_factory=list)
    offset: int = 0  # tokens already turned into mel
    hop: int = TOKEN_HOP
    vocoder: object | None = None  # the vocoder's stream (cross-fade, or v3's causal window)


class V2Segment:
    """One segment's tokens -> waveform with the official v2/v3 chunking, per-request state."""

    def __init__(
        self,
        pipeline: V2Pipeline,
        inputs: ModelInputs,
        generator: torch.Generator,
        stream: bool,
        speed: float,
    ) -> None:
        self.pipeline, self.inputs, self.generator = pipeline, inputs, generator
        self.stream, self.speed = stream, speed
        self.state = _Stream()
        prompt_len = inputs.flow_prompt_speech_token.shape[1]
        self.prompt_pad = math.ceil(prompt_len / TOKEN_HOP) * TOKEN_HOP - prompt_len
        self.flow_stream = pipeline._start_flow_stream(inputs) if stream else None
        self.pushed = 0  # tokens handed to the incremental flow so far

    def push(self, token: int) -> torch.Tensor | None:
        """Add a token; returns a waveform piece when a streaming chunk is complete."""
        state, pipeline = self.state, self.pipeline
        state.tokens.append(token)
        hop = state.hop + (self.prompt_pad if state.offset == 0 else 0)
        if not self.stream or len(state.tokens) - state.offset < hop + pipeline.lookahead:
            return None
        end = state.offset + hop + pipeline.lookahead
        if self.flow_stream is not None:  # only the new chunk is computed
            mel = pipeline._flow_step(
                self.flow_stream, state.tokens[self.pushed : end], finalize=False
            )
            self.pushed = end
        else:  # reference path: re-run the flow over everything, as the official does
            mel = pipeline._flow(
                state, self.inputs, state.tokens[:end], streaming=True, finalize=False
            )
        state.offset += hop
        state.hop = min(MAX_TOKEN_HOP, state.hop * HOP_GROWTH)
        return pipeline._vocode(state, mel, self.generator, finalize=False)

    def finish(self) -> torch.Tensor:
        """The last piece, from the tokens not yet turned into audio."""
        state, pipeline = self.state, self.pipeline
        if self.flow_stream is not None:
            # The official flows the remainder with full attention over the whole history; the
            # incremental stream keeps its chunk masks so the last chunk costs as little as the rest.
            mel = pipeline._flow_step(self.flow_stream, state.tokens[self.pushed :], finalize=True)
        else:
            mel = pipeline._flow(state, self.inputs, state.tokens, streaming=False, finalize=True)
        return pipeline._vocode(state, mel, self.generator, finalize=True, speed=self.speed)


class V2Pipeline:
    """LLM -> causal flow -> HiFT for CosyVoice2 (``causal_vocoder=False``) and CosyVoice3."""

    def __init__(
        self,
        llm: torch.nn.Module,
        flow: torch.nn.Module,
        hift: torch.nn.Module,
        sample_rate: int,
        version: int,
    ) -> None:
        self.llm, self.flow, self.hift = llm, flow, hift
        self.sample_rate = sample_rate
        self.version = version
        self.spec = spec(version)
        self.lookahead = int(flow.pre_lookahead_len)
        self.mel_ratio = int(flow.token_mel_ratio)

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    # ------------------------------------------------------------------ tokens
    def task(self, inputs: ModelInputs, sampler, policy: LengthPolicy = OFFICIAL_LENGTHS) -> Task:
        """The decoding task of one segment (the engine loop steps it with other requests')."""
        task = decoding_task(self.llm, inputs, sampler, policy)
        if self.spec.silent_tokens and inputs.source_speech_token is None:
            task = drop_long_silences(task, self.spec.silent_tokens, self.spec.max_silent_run)
        return task

    def speech_tokens(
        self, inputs: ModelInputs, sampler, policy: LengthPolicy = OFFICIAL_LENGTHS
    ) -> Iterator[int]:
        """One segment's speech tokens, decoded alone (a batch of one)."""
        return run_task_alone(self.llm, self.task(inputs, sampler, policy))

    # ------------------------------------------------------------------ synthesis
    def start(
        self, inputs: ModelInputs, generator: torch.Generator, stream: bool, speed: float = 1.0
    ) -> V2Segment:
        """The token -> waveform state of one segment; push tokens in, pieces come out."""
        return V2Segment(self, inputs, generator, stream, speed)

    def synthesize(
        self,
        inputs: ModelInputs,
        sampler,
        generator: torch.Generator,
        stream: bool,
        speed: float = 1.0,
    ) -> Iterator[torch.Tensor]:
        """Waveform pieces [1, N] of one segment, computed alone."""
        segment = self.start(inputs, generator, stream, speed)
        for token in self.speech_tokens(inputs, sampler):
            piece = segment.push(token)
            if piece is not None:
                yield piece
        yield segment.finish()

    def _start_flow_stream(self, inputs: ModelInputs):
        if not hasattr(self.flow, "new_stream"):
            return None
        with torch.inference_mode():
            return self.flow.new_stream(
                inputs.flow_prompt_speech_token, inputs.prompt_speech_feat, inputs.flow_embedding
            )

    @torch.inference_mode()
    def _flow_step(self, flow_stream, tokens: list[int], finalize: bool) -> torch.Tensor:
        token = torch.tensor([tokens], dtype=torch.int32, device=self.device).reshape(1, -1)
        return self.flow.stream_step(flow_stream, token, finalize=finalize).float()

    @torch.inference_mode()
    def _flow(
        self,
        state: _Stream,
        inputs: ModelInputs,
        tokens: list[int],
        streaming: bool,
        finalize: bool,
    ) -> torch.Tensor:
        device = self.device
        token = torch.tensor([tokens], dtype=torch.int32, device=device).reshape(1, -1)
        prompt_token = inputs.flow_prompt_speech_token
        mel, _ = self.flow.inference(
            token=token,
            token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
            prompt_token=prompt_token,
            prompt_token_len=torch.tensor(
                [prompt_token.shape[1]], dtype=torch.int32, device=device
            ),
            prompt_feat=inputs.prompt_speech_feat,
            prompt_feat_len=torch.tensor(
                [inputs.prompt_speech_feat.shape[1]], dtype=torch.int32, device=device
            ),
            embedding=inputs.flow_embedding,
            streaming=streaming,
            finalize=finalize,
        )
        return mel.float()[:, :, state.offset * self.mel_ratio :]

    @torch.inference_mode()
    def _vocode(
        self,
        state: _Stream,
        mel: torch.Tensor,
        generator: torch.Generator,
        finalize: bool,
        speed: float = 1.0,
    ) -> torch.Tensor:
        if self.spec.causal_vocoder:
            return self._vocode_causal(state, mel, finalize, speed)
        if state.vocoder is None:
            state.vocoder = self.hift.new_stream(V2_MEL_CACHE)
        return self.hift.stream_step(state.vocoder, mel, generator, finalize, speed)

    def _vocode_causal(
        self, state: _Stream, mel: torch.Tensor, finalize: bool, speed: float
    ) -> torch.Tensor:
        """v3: the causal vocoder. Streams keep a window of recent frames and the running source
        phase (the official re-vocodes the whole history each chunk); a whole utterance is one call."""
        if state.vocoder is None and finalize:  # not streaming (or a single-chunk stream)
            if speed != 1.0:
                mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
            speech, _ = self.hift.inference(speech_feat=mel, finalize=True)
            return speech
        if state.vocoder is None:
            state.vocoder = self.hift.new_stream()
        return self.hift.stream_step(state.vocoder, mel, finalize=finalize)
