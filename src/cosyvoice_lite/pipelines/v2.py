"""CosyVoice2 / CosyVoice3 token -> waveform, streaming and not.

Chunking follows the official ``CosyVoice2Model.tts``: the first chunk is flowed once
``25 + prompt pad`` tokens plus the 3-token look-ahead exist (the pad makes prompt + first hop a
multiple of the 25-token training chunk), later hops double up to 100. Unlike the official, the hop
progression starts afresh for every request (the official mutates it on the shared model) and all
state lives in ``_Stream`` objects owned by one request.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..networks.abort import check
from ..networks.flow_matching import stream_estimator
from ..networks.hift import at_speed
from ..networks.utterances import new_frames
from .common import FlowWork, ModelInputs, Pipeline, Segment, UtteranceWork
from .prompt_flow import DEFAULT_BUDGET_BYTES, PromptFlowCache

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


class V2Segment(Segment):
    """One segment's tokens -> waveform with the official v2/v3 chunking, per-request state.

    A stream calls the incremental flow once per audio piece (the official hop schedule), when
    the piece's last token and its look-ahead are there: every whole chunk of the piece in one
    call (the prompt's partial last chunk with the first hop). Chunks computed as each became
    ready, beside decoding, made more and smaller calls that time-sliced the cores the LLM's
    products were using: on 2 cores streams took 1.1-1.35x longer, their first audio the same
    (benchmarks/README.md, "One flow call per audio piece")."""

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
        self.flow_stream = None  # made at the first flow call, in the audio worker (see push)
        self.unflowed: list[int] = []  # tokens not handed to the flow yet
        self.first_piece_tokens = self._hop() + pipeline.lookahead if stream else None

    def piece_due(self) -> bool:
        """Whether the next token completes a streaming piece."""
        return self.stream and self._tokens_to_piece() <= 1

    def due_in(self) -> int | None:
        """Tokens until the next one that makes a flow call due: the one completing the piece
        (None: none that could join a batch: not a stream, or past its cache budget)."""
        if not self.stream:
            return None
        flow_stream = self.flow_stream
        if flow_stream is not None and flow_stream.frozen_at is not None:
            return None  # past its cache budget: solved alone
        return max(1, self._tokens_to_piece())

    def _tokens_to_piece(self) -> int:
        """Tokens still to come up to the one completing the piece (its look-ahead included)."""
        state = self.state
        return self._hop() + self.pipeline.lookahead - (len(state.tokens) - state.offset)

    def _hop(self) -> int:
        """Tokens of the next piece: the first one pads prompt + hop to whole training chunks."""
        return self.state.hop + (self.prompt_pad if self.state.offset == 0 else 0)

    def accept(self, token: int) -> FlowWork | None:
        """Add a token; the flow call it makes due (the end of a streaming piece), or None."""
        due = self.piece_due()
        self.state.tokens.append(token)
        if not self.stream:
            return None
        self.unflowed.append(token)
        if not due:
            return None
        work, self.unflowed = FlowWork(self._flow_stream(), self.unflowed), []
        return work

    def complete(self, mel: torch.Tensor) -> torch.Tensor:
        """The waveform of the piece that the flow call ``accept`` made due computed."""
        return self.pipeline._vocode(
            self.state, self.piece_mel(mel), self.generator, finalize=False
        )

    def piece_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """The mel of a piece, from the flow call ``accept`` made due (every one completes a
        piece: the engine accepts no further token of a row before its due call ran), to vocode
        (``V2Pipeline.complete_pieces``); the stream moves on to its next piece."""
        state = self.state
        state.offset += self._hop()
        state.hop = min(MAX_TOKEN_HOP, state.hop * HOP_GROWTH)
        return mel

    def whole_utterance(self) -> UtteranceWork | None:
        if self.stream or not self.state.tokens:
            return None
        return UtteranceWork(self.inputs, self.state.tokens, self.generator, self.speed)

    def finish(self, speech: torch.Tensor | None = None) -> torch.Tensor:
        """The last piece, from the tokens not yet turned into audio; ``speech``: the whole
        utterance's waveform, if the engine computed it with others (``whole_utterance``)."""
        if speech is not None:
            return speech
        state, pipeline = self.state, self.pipeline
        if not state.tokens:
            # no speech token: the LLM stopped at once (CosyVoice3 masks only its sos before
            # min_len, as the official, so it can draw its eos first), or every token was a long
            # silence: no audio for this segment, the request goes on
            return torch.zeros(1, 0)
        if self.stream:
            # The official flows the remainder with full attention over the whole history; the
            # incremental stream keeps its chunk masks so the last chunk costs as little as the rest.
            work = FlowWork(self._flow_stream(), self.unflowed, finalize=True)
            mel = pipeline.flow_steps([work])[0]
        else:
            work = UtteranceWork(self.inputs, state.tokens, self.generator, self.speed)
            mel = pipeline._flow_batch([work])[0]
        return pipeline._vocode(state, mel, self.generator, finalize=True, speed=self.speed)

    def _flow_stream(self):
        if self.flow_stream is None:  # the voice's prompt chunks are computed once per voice
            pipeline = self.pipeline
            self.flow_stream = pipeline.prompt_flows.stream(pipeline.flow, self.inputs)
            self.flow_stream.cache_budget = pipeline.stream_cache_bytes
        return self.flow_stream


class V2Pipeline(Pipeline):
    """LLM -> causal flow -> HiFT for CosyVoice2 (``causal_vocoder=False``) and CosyVoice3."""

    segment_class = V2Segment
    batches_flow_chunks = True

    def __init__(
        self,
        llm: torch.nn.Module,
        flow: torch.nn.Module,
        hift: torch.nn.Module,
        sample_rate: int,
        version: int,
        prompt_cache_bytes: int = DEFAULT_BUDGET_BYTES,
        stream_cache_bytes: int | None = None,
        stream_cache_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(llm, flow, hift, sample_rate, version)
        self.lookahead = int(flow.pre_lookahead_len)
        # every stream of a voice forks from its primed prompt: one cache dtype for all
        self.prompt_flows = PromptFlowCache(prompt_cache_bytes, stream_cache_dtype)
        # a stream's own flow caches beyond this re-solve their later frames (None: unbounded)
        self.stream_cache_bytes = stream_cache_bytes
        self.vocoder_batches = 0  # vocoder calls that held several rows (tests, metrics)
        self._count_lock = threading.Lock()  # audio workers share the pipeline

    @torch.inference_mode()
    def warm_graphs(self) -> None:
        """`Pipeline.warm_graphs`, and a stream's graphs (one and two rows a call: one stream
        alone on each thread, and a thread's pair) on synthetic tokens, with the streams' cache
        dtype."""
        super().warm_graphs()
        flow = self.flow
        if getattr(stream_estimator(flow.decoder), "graphs", None) is None:
            return
        projection = flow.spk_embed_affine_layer
        embedding = torch.zeros(1, projection.in_features, device=self.device)
        token = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        feat = torch.zeros(1, 0, projection.out_features, device=self.device)
        tokens = torch.zeros(1, 10, dtype=torch.long, device=self.device)
        for count in (1, 2):
            check(f"tracing a stream's graph of {count} rows")  # the engine may be closing
            cache = self.prompt_flows.cache_dtype
            states = [flow.new_stream(token, feat, embedding, cache) for _ in range(count)]
            flow.stream_steps(states, [tokens] * count, [True] * count)

    def prime_voice(self, inputs: ModelInputs, evict: bool = True) -> bool:
        """The voice's prompt frames through the streaming flow, kept for its streams (False:
        not kept, e.g. over the cache budget; without ``evict``, when keeping it would push out
        a voice kept earlier)."""
        return self.prompt_flows.prime(self.flow, inputs, evict)

    @torch.inference_mode()
    def _flow_batch(self, works: list[UtteranceWork]) -> list[torch.Tensor]:
        """Whole utterances' mels with full attention, as the official non-streaming path; several
        are one padded batch (``UtteranceFlow.inference``: each row as it is alone)."""
        device = self.device

        def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            """[1, n, ...] rows padded along n into [B, max n, ...], and their lengths."""
            lengths = torch.tensor([r.shape[1] for r in rows], dtype=torch.int32, device=device)
            if len(rows) == 1:
                return rows[0], lengths
            size = max(r.shape[1] for r in rows)
            batch = rows[0].new_zeros(len(rows), size, *rows[0].shape[2:])
            for index, row in enumerate(rows):
                batch[index, : row.shape[1]] = row[0]
            return batch, lengths

        tokens = [torch.tensor([w.tokens], dtype=torch.int32, device=device) for w in works]
        inputs = [w.inputs for w in works]
        mel, _ = self.flow.inference(
            *padded(tokens),
            *padded([i.flow_prompt_speech_token for i in inputs]),
            *padded([i.prompt_speech_feat for i in inputs]),
            embedding=torch.cat([i.flow_embedding for i in inputs]),
            streaming=False,
            finalize=True,
        )
        if len(works) == 1:
            return [mel.float()]
        ratio = self.flow.token_mel_ratio
        frames = [
            new_frames(
                ratio,
                i.flow_prompt_speech_token.shape[1],
                len(w.tokens),
                i.prompt_speech_feat.shape[1],
            )
            for i, w in zip(inputs, works, strict=True)
        ]
        return [mel[row : row + 1, :, :n].contiguous() for row, n in enumerate(frames)]

    @torch.inference_mode()
    def _vocode_batch(
        self, works: list[UtteranceWork], mels: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Whole utterances' waveforms, each as ``_vocode`` gives it alone: with
        ``vocoder_batch`` the vocoder's convolutions as one padded batch (the networks'
        ``inference_rows``), otherwise one after another."""
        if len(works) == 1 or not self.vocoder_batch:
            return [
                self._vocode(_Stream(), mel, work.generator, True, work.speed)
                for mel, work in zip(mels, works, strict=True)
            ]
        mels = [at_speed(mel, work.speed) for mel, work in zip(mels, works, strict=True)]
        if self.spec.causal_vocoder:
            speech = self.hift.inference_rows(mels)
        else:
            speech = self.hift.inference_rows(mels, [work.generator for work in works])
        self._count_vocoder_batch()
        return speech

    def _count_vocoder_batch(self) -> None:
        with self._count_lock:
            self.vocoder_batches += 1

    @torch.inference_mode()
    def complete_pieces(
        self, segments: list[Segment], mels: list[torch.Tensor]
    ) -> Iterable[torch.Tensor | BaseException | None]:
        """With ``vocoder_batch``, the pieces that streams' flow calls completed are vocoded as
        one padded batch (the vocoders' ``stream_steps``: each stream as alone). An error there
        (out of memory, say: a stream's own inputs come from its flow and are checked there)
        fails those streams, whose vocoder states and generators have then moved."""
        if not self.vocoder_batch:
            return super().complete_pieces(segments, mels)  # lazily: each piece leaves at once
        out: list[torch.Tensor | BaseException | None] = []
        due: list[int] = []
        for index, (segment, mel) in enumerate(zip(segments, mels, strict=True)):
            try:
                mel = segment.piece_mel(mel)
            except Exception as exc:  # noqa: BLE001 - handed to its row
                mel = exc
            out.append(mel)
            if isinstance(mel, torch.Tensor):
                due.append(index)
        if not due:
            return out
        states = [segments[i].state for i in due]
        for state in states:
            if state.vocoder is None:
                state.vocoder = self._new_vocoder_stream()
        vocoders = [state.vocoder for state in states]
        piece_mels = [out[i] for i in due]
        try:
            if self.spec.causal_vocoder:
                pieces = self.hift.stream_steps(vocoders, piece_mels, [False] * len(due))
            else:
                generators = [segments[i].generator for i in due]
                pieces = self.hift.stream_steps(
                    vocoders, piece_mels, generators, [False] * len(due), [1.0] * len(due)
                )
        except Exception as exc:  # noqa: BLE001 - the batch's streams fail
            pieces = [exc] * len(due)
        else:
            if len(due) > 1:
                self._count_vocoder_batch()
        for index, piece in zip(due, pieces, strict=True):
            out[index] = piece
        return out

    def _new_vocoder_stream(self):  # noqa: ANN202 - the vocoder's own state type
        if self.spec.causal_vocoder:
            return self.hift.new_stream()
        return self.hift.new_stream(V2_MEL_CACHE)

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
            state.vocoder = self._new_vocoder_stream()
        return self.hift.stream_step(state.vocoder, mel, generator, finalize, speed)

    def _vocode_causal(
        self, state: _Stream, mel: torch.Tensor, finalize: bool, speed: float
    ) -> torch.Tensor:
        """v3: the causal vocoder. Streams keep a window of recent frames and the running source
        phase (the official re-vocodes the whole history each chunk); a whole utterance is one call."""
        if state.vocoder is None and finalize:  # not streaming (or a single-chunk stream)
            speech, _ = self.hift.inference(speech_feat=at_speed(mel, speed), finalize=True)
            return speech
        if state.vocoder is None:
            state.vocoder = self._new_vocoder_stream()
        return self.hift.stream_step(state.vocoder, mel, finalize=finalize)
