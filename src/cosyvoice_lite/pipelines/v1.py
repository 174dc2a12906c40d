"""CosyVoice v1 token -> waveform, streaming and not, with the official chunking and cross-fades.

The flow and the vocoder stream through the same ``new_stream`` / ``stream_step`` contract as
every other version; the state lives in per-request stream objects, the networks are shared and
stateless, so concurrent requests never see each other's caches.
"""

from __future__ import annotations

import torch

from .common import FlowWork, ModelInputs, Pipeline, Segment

TOKEN_OVERLAP = 20  # tokens shared by consecutive streaming chunks
MEL_CACHE = 20  # mel frames of look-back given to the vocoder


class V1Segment(Segment):
    """One segment's tokens -> waveform: the official chunking (a fixed hop plus 20 overlap tokens
    when streaming; everything at the end otherwise)."""

    def __init__(
        self,
        pipeline: V1Pipeline,
        inputs: ModelInputs,
        generator: torch.Generator,
        stream: bool,
        speed: float,
    ) -> None:
        self.pipeline, self.generator = pipeline, generator
        self.stream, self.speed = stream, speed
        self.flow = pipeline.flow.new_stream(
            inputs.flow_prompt_speech_token,
            inputs.prompt_speech_feat,
            inputs.flow_embedding,
            generator,
        )
        self.vocoder = pipeline.hift.new_stream(MEL_CACHE)
        self.pending: list[int] = []
        self.first_piece_tokens = pipeline.min_hop + TOKEN_OVERLAP if stream else None

    def piece_due(self) -> bool:
        """Whether the next token completes a streaming piece."""
        return self.stream and len(self.pending) + 1 >= self.pipeline.min_hop + TOKEN_OVERLAP

    def due_in(self) -> int | None:
        """Tokens until the next one that completes a chunk (None: not a stream)."""
        if not self.stream:
            return None
        return max(1, self.pipeline.min_hop + TOKEN_OVERLAP - len(self.pending))

    def accept(self, token: int) -> FlowWork | None:
        """Add a token; the flow call of the chunk it completes (streaming), or None."""
        due = self.piece_due()
        self.pending.append(token)
        if not due:
            return None
        hop = self.pipeline.min_hop
        chunk = self.pending[: hop + TOKEN_OVERLAP]
        self.pending = self.pending[hop:]
        return FlowWork(self.flow, chunk)

    @torch.inference_mode()
    def complete(self, mel: torch.Tensor) -> torch.Tensor:
        """The waveform piece of a streaming chunk's mel."""
        return self.pipeline.hift.stream_step(self.vocoder, mel, self.generator, False, 1.0)

    def finish(self, speech: torch.Tensor | None = None) -> torch.Tensor:
        """The last piece, from the tokens not yet turned into audio (v1 never hands out a
        whole utterance: its flow draws noise from the request's generator)."""
        if speech is not None:
            raise ValueError("a v1 segment computes its own last piece")
        return self._token2wav(self.pending, finalize=True)

    @torch.inference_mode()
    def _token2wav(self, tokens: list[int], finalize: bool) -> torch.Tensor:
        pipeline = self.pipeline
        token = torch.tensor([tokens], dtype=torch.int32, device=pipeline.device)
        mel = pipeline.flow.stream_step(self.flow, token, finalize=finalize)
        return pipeline.hift.stream_step(
            self.vocoder, mel, self.generator, finalize, self.speed if finalize else 1.0
        )


class V1Pipeline(Pipeline):
    """LLM tokens -> flow mel -> HiFT waveform for CosyVoice-300M models."""

    segment_class = V1Segment

    def __init__(
        self,
        llm: torch.nn.Module,
        flow: torch.nn.Module,
        hift: torch.nn.Module,
        frame_rate: int,
        sample_rate: int,
    ) -> None:
        super().__init__(llm, flow, hift, sample_rate, version=1)
        self.min_hop = 2 * frame_rate  # official token_min_hop_len; the hop never grows (scale 1)
