"""Pieces shared by the version pipelines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..decoding import (
    OFFICIAL_LENGTHS,
    LengthPolicy,
    Task,
    TextSource,
    bistream_task,
    drop_long_silences,
    given_tokens_task,
    run_alone,
    speech_token_task,
)
from ..networks.abort import ComputationAborted
from ..networks.flow_matching import time_span
from ..versions import spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInputs:
    """Everything the networks need for one text segment (the official ``model_input`` dict).

    Token tensors are int32 [1, T]; embeddings [1, 192] or [0, 192] when absent; the prompt mel is
    [1, T_mel, 80]. ``text`` may be an iterator of token tensors for streaming text input.
    """

    text: object
    prompt_text: torch.Tensor
    llm_prompt_speech_token: torch.Tensor
    llm_embedding: torch.Tensor
    flow_prompt_speech_token: torch.Tensor
    prompt_speech_feat: torch.Tensor
    flow_embedding: torch.Tensor
    source_speech_token: torch.Tensor | None = None


@dataclass
class FlowWork:
    """One stream's next flow call: its flow stream, the tokens to add, whether they end it.
    A segment's ``accept`` hands it out; ``Pipeline.flow_steps`` computes several at once."""

    stream: Any
    tokens: list[int]
    finalize: bool = False


@dataclass(frozen=True)
class UtteranceWork:
    """A whole utterance (a segment not streamed): its inputs, every speech token, and what its
    vocoding takes (the request's generator, its speed). ``Pipeline.utterances`` computes
    several at once."""

    inputs: ModelInputs
    tokens: list[int]
    generator: torch.Generator
    speed: float = 1.0


def utterance_groups(lengths: list[int], max_rows: int, slack: float = 1.25) -> list[list[int]]:
    """Indices of utterances of ``lengths`` in groups of at most ``max_rows`` that are computed
    as one padded batch: sorted by length, a group takes the next longer one while its padded
    size (rows x longest) stays within ``slack`` x the frames it holds."""
    groups: list[list[int]] = []
    total = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        length = lengths[index]
        if (
            group is None
            or len(group) >= max_rows
            or (len(group) + 1) * length > slack * (total + length)
        ):
            groups.append([index])
            total = length
        else:
            group.append(index)
            total += length
    return groups


class Segment:
    """One segment's audio stage: tokens in, waveform pieces out. ``accept(token)`` takes a token
    and returns the flow call it makes due (or None); ``complete(mel)`` takes that call's mel and
    returns the waveform piece it completes (or None). The engine's audio workers compute the
    due flow calls of several streams together; ``push`` is one token alone."""

    pipeline: Pipeline
    # Tokens after which the segment's first streaming piece is due (None: not streaming).
    first_piece_tokens: int | None = None

    def accept(self, token: int) -> FlowWork | None:
        raise NotImplementedError

    def due_in(self) -> int | None:
        """Tokens until the next one that makes a flow call due (1: the next; None: no call
        that could join a batch before the segment ends). Lets a worker wait for streams
        about to join a batch."""
        raise NotImplementedError

    def complete(self, mel: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def whole_utterance(self) -> UtteranceWork | None:
        """The segment's end when it is one whole utterance (not streamed), which the engine may
        compute together with others' (``Pipeline.utterances``) and hand to ``finish``; None:
        the segment ends its own way."""
        return None

    def finish(self, speech: torch.Tensor | None = None) -> torch.Tensor:
        """The last piece; ``speech``: the whole utterance's waveform if already computed."""
        raise NotImplementedError

    def push(self, token: int) -> torch.Tensor | None:
        """Add a token; returns a waveform piece when a streaming chunk is complete."""
        work = self.accept(token)
        if work is None:
            return None
        return self.complete(self.pipeline.flow_steps([work])[0])


def decoding_task(
    lm,
    inputs: ModelInputs,
    sampler,
    policy: LengthPolicy,
    on_text: Callable[[], None] | None = None,
) -> Task:
    """The speech-token task of one segment: given tokens (voice conversion), streaming text in
    (bistream; ``on_text`` is called as each piece arrives), or the plain official decoding."""
    if inputs.source_speech_token is not None:
        return given_tokens_task(inputs.source_speech_token)
    if not isinstance(inputs.text, torch.Tensor):
        return bistream_task(
            lm,
            TextSource(inputs.text, on_arrival=on_text),
            inputs.prompt_text,
            inputs.llm_prompt_speech_token,
            sampler,
            policy,
        )
    return speech_token_task(
        lm,
        inputs.text,
        inputs.prompt_text,
        inputs.llm_prompt_speech_token,
        inputs.llm_embedding,
        sampler,
        policy,
    )


class Pipeline:
    """What every version's pipeline shares: a segment's decoding task (stepped by the engine loop
    with other requests') and its audio stage (``segment_class``: push tokens in, waveform pieces
    come out), plus both computed alone (tests, tools)."""

    segment_class: type
    # whether the flow computes several streams' chunks in one batch (stream_steps), so an
    # audio worker waits a moment for streams about to be due
    batches_flow_chunks = False
    # whole utterances computed as one padded flow batch at most (1: each alone); a load-time
    # choice (Engine.load), worth it where the batch runs in parallel (an accelerator)
    utterance_batch = 1
    # whether such a batch's vocoding, and that of streams' pieces due together, is one padded
    # batch too (else one after another)
    vocoder_batch = False
    # run after every streaming flow call (a load-time choice: on a CPU, the freed heap back to
    # the OS, see Engine.load)
    after_stream_call: Callable[[], None] | None = None

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

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    @torch.inference_mode()
    def warm_graphs(self) -> None:
        """Trace the flow's captured graphs (networks/graph_capture.py) on synthetic frames now,
        rather than in the first request that needs them (1-3 s each at full size): the engine
        runs this in the background after a load. A whole utterance's rows here, as its row
        split computes them; `V2Pipeline` adds a stream's. The LLM's decoding steps first, where
        they are captured."""
        if callable(getattr(self.llm, "warm_graphs", None)):
            self.llm.warm_graphs()
        cfm = self.flow.decoder
        if getattr(cfm.estimator, "graphs", None) is None:
            return
        projection = self.flow.spk_embed_affine_layer  # speaker embedding -> mel channels
        dtype, mels = projection.weight.dtype, projection.out_features
        x = torch.zeros(1, mels, 20, device=self.device)  # the solver's float32 state
        mask = torch.ones(1, 1, x.shape[2], device=self.device, dtype=dtype)
        spks = torch.zeros(1, mels, device=self.device, dtype=dtype)
        t_span = time_span(cfm.steps, cfm.t_scheduler, x)
        cfm.solve_euler(x, t_span, x.to(dtype), mask, spks, x.to(dtype))

    def task(
        self,
        inputs: ModelInputs,
        sampler,
        policy: LengthPolicy = OFFICIAL_LENGTHS,
        on_text: Callable[[], None] | None = None,
    ) -> Task:
        """The decoding task of one segment; long silences are dropped where the version says.
        ``on_text``: called as streamed text arrives (the loop's wake-up)."""
        task = decoding_task(self.llm, inputs, sampler, policy, on_text)
        if self.spec.silent_tokens and inputs.source_speech_token is None:
            task = drop_long_silences(task, self.spec.silent_tokens, self.spec.max_silent_run)
        return task

    def utterances(self, works: list[UtteranceWork]) -> tuple[list[torch.Tensor | None], int]:
        """The waveform [1, samples] of each whole utterance, its flow and its vocoder computed
        in padded batches of similar lengths (``utterance_groups``) of at most
        ``utterance_batch``, and how many batches held several. A batch that fails (e.g. out of
        memory; a BaseException such as SystemExit too, but not ComputationAborted: the caller
        stopped wanting them) gives None for its utterances: the caller computes those alone, so
        a bad one fails alone."""
        lengths = [w.inputs.flow_prompt_speech_token.shape[1] + len(w.tokens) for w in works]
        speech: list[torch.Tensor | None] = [None] * len(works)
        batches = 0
        for group in utterance_groups(lengths, self.utterance_batch):
            batch = [works[i] for i in group]
            # the vocoder draws from each request's generator: a failed batch puts them back, so
            # that each utterance computed alone afterwards is still the one its seed gives
            drawn = [work.generator.get_state() for work in batch]
            try:
                waveforms = self._vocode_batch(batch, self._flow_batch(batch))
            except ComputationAborted:
                raise
            except BaseException:  # noqa: BLE001 - each of them alone then
                log.exception("a batch of %d whole utterances failed", len(group))
                for work, state in zip(batch, drawn, strict=True):
                    work.generator.set_state(state)
                continue
            batches += len(group) > 1
            for index, waveform in zip(group, waveforms, strict=True):
                speech[index] = waveform
        return speech, batches

    def _flow_batch(self, works: list[UtteranceWork]) -> list[torch.Tensor]:
        """The mels of whole utterances computed as one batch (versions whose segments hand
        out ``whole_utterance``)."""
        raise NotImplementedError

    def _vocode_batch(
        self, works: list[UtteranceWork], mels: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The waveforms of whole utterances' mels computed as one batch."""
        raise NotImplementedError

    @torch.inference_mode()
    def flow_steps(self, works: list[FlowWork]) -> list[torch.Tensor]:
        """The float32 mel of each stream's flow call, the streams computed together (the flow's
        ``stream_steps``)."""
        device = self.device
        tokens = [
            torch.tensor(w.tokens, dtype=torch.int32, device=device).reshape(1, -1) for w in works
        ]
        mels = self.flow.stream_steps(
            [w.stream for w in works], tokens, [w.finalize for w in works]
        )
        mels = [mel.float() for mel in mels]
        if self.after_stream_call is not None:
            self.after_stream_call()
        return mels

    def complete_pieces(
        self, segments: list[Segment], mels: list[torch.Tensor]
    ) -> Iterable[torch.Tensor | BaseException | None]:
        """Each segment's ``complete(mel)`` after a batch of flow calls: its waveform piece,
        None (no piece due), or the error that fails that segment alone (a BaseException such
        as SystemExit too; ComputationAborted goes to the caller). Computed as they are taken, so
        each piece can leave before the next one is vocoded."""
        for segment, mel in zip(segments, mels, strict=True):
            try:
                piece = segment.complete(mel)
            except ComputationAborted:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to its row
                piece = exc
            yield piece

    def speech_tokens(
        self, inputs: ModelInputs, sampler, policy: LengthPolicy = OFFICIAL_LENGTHS
    ) -> Iterator[int]:
        """One segment's speech tokens, decoded alone (a batch of one)."""
        return run_alone(self.llm, self.task(inputs, sampler, policy))

    def prime_voice(self, inputs: ModelInputs, evict: bool = True) -> bool:
        """Compute what every stream of this voice shares, ahead of them; False when the version
        keeps nothing per voice (see the v2/v3 pipeline)."""
        return False

    def start(
        self, inputs: ModelInputs, generator: torch.Generator, stream: bool, speed: float = 1.0
    ):
        """The token -> waveform state of one segment; push tokens in, pieces come out."""
        return self.segment_class(self, inputs, generator, stream, speed)

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
