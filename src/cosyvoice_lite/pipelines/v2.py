"""CosyVoice2 / CosyVoice3 token -> waveform, streaming and not.

Chunking follows the official ``CosyVoice2Model.tts``: the first chunk is flowed once
``25 + prompt pad`` tokens plus the 3-token look-ahead exist (the pad makes prompt + first hop a
multiple of the 25-token training chunk), later hops double up to 100. Unlike the official, the hop
progression starts afresh for every request (the official mutates it on the shared model) and all
state lives in ``_Stream`` objects owned by one request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .common import ModelInputs, fade_in_out

TOKEN_HOP = 25  # training chunk size: the first hop
MAX_TOKEN_HOP = 100
HOP_GROWTH = 2
V2_MEL_CACHE = 8  # vocoder look-back (mel frames) for the v2 HiFT cross-fade
HOP_LENGTH = 480  # vocoder samples per mel frame (24 kHz)
# CosyVoice3: FSQ silence/breath tokens; runs longer than 5 are not sent to the flow (official llm_job)
V3_SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
MAX_SILENT_RUN = 5


@dataclass
class _Stream:
    """Per-request state: tokens so far, the flow offset and the vocoder caches."""

    tokens: list[int] = field(default_factory=list)
    offset: int = 0  # tokens already turned into mel
    hop: int = TOKEN_HOP
    hift_mel: torch.Tensor | None = None  # v2: look-back mel frames for the cross-fade
    hift_source: torch.Tensor | None = None
    hift_speech: torch.Tensor | None = None
    hift_stream: object | None = None  # v3: the causal vocoder's streaming state


class V2Pipeline:
    """LLM -> causal flow -> HiFT for CosyVoice2 (``causal_vocoder=False``) and CosyVoice3."""

    def __init__(self, llm: torch.nn.Module, flow: torch.nn.Module, hift: torch.nn.Module,
                 sample_rate: int, compute: Callable[[], AbstractContextManager],
                 version: int) -> None:
        self.llm, self.flow, self.hift = llm, flow, hift
        self.sample_rate = sample_rate
        self.compute = compute
        self.version = version
        self.lookahead = int(flow.pre_lookahead_len)
        self.mel_ratio = int(flow.token_mel_ratio)
        self.source_cache_len = V2_MEL_CACHE * HOP_LENGTH
        self.speech_window = torch.from_numpy(np.hamming(2 * self.source_cache_len))

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    # ------------------------------------------------------------------ tokens
    def speech_tokens(self, inputs: ModelInputs, sampler) -> Iterator[int]:
        if inputs.source_speech_token is not None:
            yield from inputs.source_speech_token.flatten().tolist()
            return
        if isinstance(inputs.text, torch.Tensor):
            tokens = self.llm.generate(inputs.text, inputs.prompt_text, inputs.llm_prompt_speech_token,
                                       sampler)
        else:  # streaming text in: an iterator of token-id pieces
            tokens = self.llm.generate_bistream(inputs.text, inputs.prompt_text,
                                                inputs.llm_prompt_speech_token, sampler)
        silent_run = 0
        while True:
            with torch.inference_mode(), self.compute():  # never held across a yield
                token = next(tokens, None)
            if token is None:
                return
            if self.version == 3:
                silent_run = silent_run + 1 if token in V3_SILENT_TOKENS else 0
                if silent_run > MAX_SILENT_RUN:
                    continue
            yield token

    # ------------------------------------------------------------------ synthesis
    def synthesize(self, inputs: ModelInputs, sampler, generator: torch.Generator,
                   stream: bool, speed: float = 1.0) -> Iterator[torch.Tensor]:
        """Waveform pieces [1, N]; see ``pieces`` for the same with an end-of-utterance flag."""
        for piece, _ in self.pieces(inputs, sampler, generator, stream, speed):
            yield piece

    def pieces(self, inputs: ModelInputs, sampler, generator: torch.Generator,
               stream: bool, speed: float = 1.0) -> Iterator[tuple[torch.Tensor, bool]]:
        state = _Stream()
        prompt_len = inputs.flow_prompt_speech_token.shape[1]
        prompt_pad = math.ceil(prompt_len / TOKEN_HOP) * TOKEN_HOP - prompt_len
        flow_stream = self._start_flow_stream(inputs) if stream else None
        pushed = 0  # tokens handed to the incremental flow so far
        for token in self.speech_tokens(inputs, sampler):
            state.tokens.append(token)
            hop = state.hop + (prompt_pad if state.offset == 0 else 0)
            if stream and len(state.tokens) - state.offset >= hop + self.lookahead:
                end = state.offset + hop + self.lookahead
                if flow_stream is not None:  # only the new chunk is computed
                    mel = self._flow_step(flow_stream, state.tokens[pushed:end], finalize=False)
                    pushed = end
                else:  # reference path: re-run the flow over everything, as the official does
                    mel = self._flow(state, inputs, state.tokens[:end], streaming=True, finalize=False)
                state.offset += hop
                state.hop = min(MAX_TOKEN_HOP, state.hop * HOP_GROWTH)
                yield self._vocode(state, mel, generator, finalize=False), False
        if flow_stream is not None:
            # The official flows the remainder with full attention over the whole history; the
            # incremental stream keeps its chunk masks so the last chunk costs as little as the rest.
            mel = self._flow_step(flow_stream, state.tokens[pushed:], finalize=True)
        else:
            mel = self._flow(state, inputs, state.tokens, streaming=False, finalize=True)
        yield self._vocode(state, mel, generator, finalize=True, speed=speed), True

    def _start_flow_stream(self, inputs: ModelInputs):
        if not hasattr(self.flow, "new_stream"):
            return None
        with torch.inference_mode(), self.compute():
            return self.flow.new_stream(inputs.flow_prompt_speech_token, inputs.prompt_speech_feat,
                                        inputs.flow_embedding)

    @torch.inference_mode()
    def _flow_step(self, flow_stream, tokens: list[int], finalize: bool) -> torch.Tensor:
        token = torch.tensor([tokens], dtype=torch.int32, device=self.device).reshape(1, -1)
        with self.compute():
            return self.flow.stream_step(flow_stream, token, finalize=finalize).float()

    @torch.inference_mode()
    def _flow(self, state: _Stream, inputs: ModelInputs, tokens: list[int], streaming: bool,
              finalize: bool) -> torch.Tensor:
        device = self.device
        token = torch.tensor([tokens], dtype=torch.int32, device=device).reshape(1, -1)
        prompt_token = inputs.flow_prompt_speech_token
        with self.compute():
            mel, _ = self.flow.inference(
                token=token,
                token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
                prompt_token=prompt_token,
                prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32, device=device),
                prompt_feat=inputs.prompt_speech_feat,
                prompt_feat_len=torch.tensor([inputs.prompt_speech_feat.shape[1]], dtype=torch.int32,
                                             device=device),
                embedding=inputs.flow_embedding,
                streaming=streaming,
                finalize=finalize,
            )
        return mel.float()[:, :, state.offset * self.mel_ratio:]

    @torch.inference_mode()
    def _vocode(self, state: _Stream, mel: torch.Tensor, generator: torch.Generator,
                finalize: bool, speed: float = 1.0) -> torch.Tensor:
        if self.version == 3:
            return self._vocode_causal(state, mel, finalize, speed)
        if state.hift_mel is not None:
            mel = torch.concat([state.hift_mel, mel], dim=2)
            cache_source = state.hift_source
        else:
            cache_source = torch.zeros(1, 1, 0, device=mel.device)
        if finalize and speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        speech, source = self.hift.inference(speech_feat=mel, cache_source=cache_source,
                                             generator=generator)
        if state.hift_speech is not None:
            speech = fade_in_out(speech, state.hift_speech, self.speech_window)
        if not finalize:
            state.hift_mel = mel[:, :, -V2_MEL_CACHE:]
            state.hift_source = source[:, :, -self.source_cache_len:]
            state.hift_speech = speech[:, -self.source_cache_len:]
            speech = speech[:, : -self.source_cache_len]
        return speech

    def _vocode_causal(self, state: _Stream, mel: torch.Tensor, finalize: bool,
                       speed: float) -> torch.Tensor:
        """v3: the causal vocoder. Streams keep a window of recent frames and the running source
        phase (the official re-vocodes the whole history each chunk); a whole utterance is one call."""
        if state.hift_stream is None and finalize:  # not streaming (or a single-chunk stream)
            if speed != 1.0:
                mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
            speech, _ = self.hift.inference(speech_feat=mel, finalize=True)
            return speech
        if state.hift_stream is None:
            state.hift_stream = self.hift.new_stream()
        return self.hift.stream_step(state.hift_stream, mel, finalize=finalize)
