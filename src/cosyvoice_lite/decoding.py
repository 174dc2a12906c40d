"""Speech-token decoding as tasks that the engine loop steps together.

A task is a generator that owns one request's decoding state (tokens so far, length bounds, the
bistream interleave), the way whisper's ``DecodingTask`` owns its call. It never runs a network:

* it yields ``Feed(inputs)`` when it needs the next-token log-probabilities after ``inputs``
  [1, T, D]; whoever drives it computes them (alone, or batched with other rows, each row on its own
  ``KVCache``) and sends back the 1-D log-probabilities;
* it yields ``Draw(scores, decoded, sampler)`` when a token is to be sampled from those
  (masked) scores; the driver sends back the id ``sampler`` chooses (alone, or with other rows'
  draws: ``sampling.sample_rows``);
* it yields an ``int`` for each speech token decided;
* it yields ``WAIT`` while it waits for streaming text that has not arrived (nothing to compute).

The loops reproduce the official ``inference`` / ``inference_bistream`` of TransformerLM (v1),
Qwen2LM (v2) and CosyVoice3LM (v3) with their quirks; every random draw happens in the request's
sampler, so a row's tokens never depend on which other rows share its steps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .errors import CosyVoiceError
from .networks.cache import KVCache
from .sampling import Sampler


@dataclass(frozen=True)
class Feed:
    """The task needs the next-token log-probabilities after feeding ``inputs`` [1, T, D]."""

    inputs: torch.Tensor


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()
"""The task waits for streaming text input; it has nothing to compute this step."""


@dataclass(frozen=True)
class Draw:
    """The task needs a token drawn by ``sampler`` from 1-D ``scores`` (log-probabilities,
    masked as the official does), ``decoded`` the tokens so far (repetition check)."""

    scores: torch.Tensor
    decoded: Sequence[int]
    sampler: Sampler

    def alone(self) -> int:
        return int(self.sampler(self.scores, self.decoded))


Task = Generator["Feed | Draw | int | _Wait", "torch.Tensor | int | None", None]


class SpeechLM(Protocol):
    """What the LLM networks (TransformerLM, Qwen2LM, CosyVoice3LM) offer decoding."""

    speech_token_size: int

    def prefix(self, text, prompt_text, prompt_speech_token, embedding) -> torch.Tensor: ...

    def speech_input(self, token: int) -> torch.Tensor: ...

    def new_cache(self) -> KVCache: ...

    def log_probs(self, inputs: torch.Tensor, caches: list[KVCache]) -> torch.Tensor: ...


@dataclass(frozen=True)
class LengthPolicy:
    """How many speech tokens a segment may have.

    The official bounds are ratios of the segment's text tokens (prompt text excluded), computed
    in float32 as the official does; ``max_tokens`` caps them, and ``ignore_eos`` (benchmarks with
    random weights) decodes exactly ``max_tokens`` tokens, masking every stop id.
    """

    min_ratio: float = 2.0
    max_ratio: float = 20.0
    max_tokens: int | None = None
    ignore_eos: bool = False

    def bounds(self, n_text_tokens: int) -> tuple[int, int]:
        if self.ignore_eos:
            return self.max_tokens, self.max_tokens
        n = np.float32(n_text_tokens)
        min_len = int(n * np.float32(self.min_ratio))
        max_len = int(n * np.float32(self.max_ratio))
        if self.max_tokens is not None:
            max_len = min(max_len, self.max_tokens)
        return min_len, max_len


OFFICIAL_LENGTHS = LengthPolicy()


def _choose(
    lm: SpeechLM,
    logp: torch.Tensor,
    decoded: list[int],
    sampler: Sampler,
    mask_eos: bool,
    policy: LengthPolicy,
) -> Generator[Draw, int, int]:
    """The sampled token (``token = yield from _choose(...)``)."""
    if mask_eos:
        # Official `sampling_ids`: masks index speech_token_size (v1/v2 eos, v3 sos).
        logp[lm.speech_token_size] = -float("inf")
    if policy.ignore_eos:
        logp[lm.speech_token_size :] = -float("inf")
    return (yield Draw(logp, decoded, sampler))


def speech_token_task(
    lm: SpeechLM,
    text: torch.Tensor,
    prompt_text: torch.Tensor,
    prompt_speech_token: torch.Tensor,
    embedding: torch.Tensor,
    sampler: Sampler,
    policy: LengthPolicy = OFFICIAL_LENGTHS,
) -> Task:
    """Official ``inference``: the prefix in one feed, then one token per step until a stop id
    (never yielded) or the length bound; the eos is masked while fewer than min_len were decoded."""
    lm_input = lm.prefix(text, prompt_text, prompt_speech_token, embedding)
    min_len, max_len = policy.bounds(torch.as_tensor(text).numel())
    decoded: list[int] = []
    for step in range(max_len):
        logp = yield Feed(lm_input)
        token = yield from _choose(lm, logp, decoded, sampler, step < min_len, policy)
        if token >= lm.speech_token_size:
            return
        yield token
        decoded.append(token)
        lm_input = lm.speech_input(token)


def given_tokens_task(tokens: torch.Tensor) -> Task:
    """Voice conversion: the speech tokens come from the source audio, no LLM."""
    yield from tokens.flatten().tolist()


class TextSource:
    """Streaming text in: token-id pieces pulled from the caller's iterator by a feeder thread, so a
    slow producer (a chat model) never stalls the loop that steps the other requests.
    ``on_arrival`` is called (from the feeder thread) once a piece, the end or an error is there
    to be polled: the loop sleeps until then instead of looking again and again."""

    PENDING = object()
    END = object()

    def __init__(
        self,
        pieces: Iterable[Sequence[int]],
        lookahead: int = 2,
        on_arrival: Callable[[], None] | None = None,
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=lookahead)
        self._on_arrival = on_arrival
        self._closed = threading.Event()
        # started by the first poll: a task closed before it ever ran (its request cancelled at
        # admission) never reaches its ``finally`` that closes this, so it must own no thread
        self._thread = threading.Thread(
            target=self._pull, args=(iter(pieces),), daemon=True, name="text-source"
        )

    def _pull(self, pieces: Iterator[Sequence[int]]) -> None:
        try:
            for piece in pieces:
                if not self._put(("piece", piece)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the task, which fails its request
            self._put(("error", exc))

    def _put(self, item: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            if self._on_arrival is not None:
                self._on_arrival()
            return True
        return False

    def poll(self) -> object:
        """The next piece, ``PENDING`` if none has arrived yet, or ``END``."""
        if self._thread.ident is None and not self._closed.is_set():
            self._thread.start()
        try:
            kind, value = self._queue.get_nowait()
        except queue.Empty:
            return self.PENDING
        if kind == "error":
            raise value
        return self.END if kind == "end" else value

    def close(self) -> None:
        self._closed.set()


def bistream_task(
    lm,
    text: TextSource,
    prompt_text: torch.Tensor,
    prompt_speech_token: torch.Tensor,
    sampler: Sampler,
    policy: LengthPolicy = OFFICIAL_LENGTHS,
) -> Task:
    """Official ``inference_bistream`` (v2/v3): text arrives piece by piece.

    Text and prompt speech are interleaved ``mix_ratio`` = 5 text : 15 speech. Once the prompt
    speech is used up, speech tokens are decoded; after every 15 of them a fill token is forced and
    decoding waits for 5 more text tokens. When the text ends, the remaining text and task_id are
    fed and decoding runs to eos. Reproduced quirks:

    * the fill schedule starts at ``(P // 15 + 1) * 15 - P`` generated tokens (P = prompt speech
      length), even though the prompt speech is consumed 15 at a time from the start;
    * prompt speech still unconsumed when the text ends is dropped;
    * if the text ends right after a fill token, the last speech embedding, already fed, is fed
      again in front of the remaining text;
    * a sampled stop id other than the fill (interleaved phase) or eos (final phase) is an error.

    The final decode is bounded by ``policy`` (max_ratio x the text tokens received, or
    max_tokens); the official has no bound.
    """
    try:
        yield from _bistream(lm, text, prompt_text, prompt_speech_token, sampler, policy)
    finally:
        text.close()  # the feeder thread stops too when the request ends early


def _bistream(
    lm,
    text: TextSource,
    prompt_text: torch.Tensor,
    prompt_speech_token: torch.Tensor,
    sampler: Sampler,
    policy: LengthPolicy,
) -> Task:
    n_text, n_speech = lm.mix_ratio
    prompt_text = lm.ids(prompt_text)
    prompt_speech = lm.embed_speech(lm.ids(prompt_speech_token))
    lm_input, prompt_text = lm.bistream_start(prompt_text)
    text_cache = lm.embed_text(prompt_text)
    n_prompt = prompt_speech.size(1)
    next_fill_index = (n_prompt // n_speech + 1) * n_speech - n_prompt
    received = 0
    spoken = 0  # speech tokens yielded (fill tokens are not speech)
    decoded: list[int] = []
    while True:
        piece = text.poll()
        if piece is TextSource.PENDING:
            yield WAIT
            continue
        if piece is TextSource.END:
            break
        ids = lm.ids(piece)
        received += ids.size(1)
        text_cache = torch.cat([text_cache, lm.embed_text(ids)], dim=1)
        # Interleave 5 text + 15 prompt-speech embeddings while both are available.
        while prompt_speech.size(1) != 0 and text_cache.size(1) >= n_text:
            lm_input = torch.cat(
                [lm_input, text_cache[:, :n_text], prompt_speech[:, :n_speech]], dim=1
            )
            text_cache, prompt_speech = text_cache[:, n_text:], prompt_speech[:, n_speech:]
        if prompt_speech.size(1) != 0:
            continue
        after_fill = bool(decoded) and decoded[-1] == lm.fill_token
        if after_fill or (not decoded and lm_input.size(1) == 1):
            if text_cache.size(1) < n_text:
                continue  # wait for more text
            new_text = text_cache[:, :n_text]
            lm_input = new_text if after_fill else torch.cat([lm_input, new_text], dim=1)
            text_cache = text_cache[:, n_text:]
        while True:
            logp = yield Feed(lm_input)
            if len(decoded) == next_fill_index:
                token = lm.fill_token
                next_fill_index += n_speech + 1
            else:
                token = yield from _choose(lm, logp, decoded, sampler, True, policy)
            if token == lm.fill_token:
                next_fill_index = len(decoded) + n_speech + 1
            decoded.append(token)
            if token >= lm.speech_token_size:
                if token == lm.fill_token:
                    break
                raise CosyVoiceError(
                    f"the LLM produced stop token {token} in the middle of streaming text input"
                )
            yield token
            spoken += 1
            if policy.max_tokens is not None and spoken >= policy.max_tokens:
                text.close()  # the segment's bound: the rest of the text is not read
                return
            lm_input = lm.speech_input(token)

    # Text finished: feed what is left of it plus task_id, then decode to eos.
    lm_input = torch.cat([lm_input, text_cache, lm.task_input()], dim=1)
    _, max_final = policy.bounds(received)
    if policy.max_tokens is not None:  # the bound is the segment's, text-mixed tokens included
        max_final = min(max_final, policy.max_tokens - spoken)
    for _ in range(max_final):
        logp = yield Feed(lm_input)
        token = yield from _choose(lm, logp, decoded, sampler, False, policy)
        decoded.append(token)
        if token >= lm.speech_token_size:
            if token == lm.eos_token:
                return
            raise CosyVoiceError(f"the LLM produced stop token {token} instead of eos")
        yield token
        lm_input = lm.speech_input(token)


def run_alone(lm: SpeechLM, task: Task) -> Iterator[int]:
    """Drive one task as a batch of one (tests, tools); the engine loop steps many together."""
    cache = lm.new_cache()
    reply = None
    while True:
        with torch.inference_mode():
            try:
                item = task.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(item, Feed):
                reply = lm.log_probs(item.inputs, [cache])[0]
                continue
            if isinstance(item, Draw):
                reply = item.alone()
                continue
        if item is WAIT:
            time.sleep(0.001)
            continue
        yield item


def drop_long_silences(task: Task, silent: frozenset[int], max_run: int) -> Task:
    """CosyVoice3's official ``llm_job``: silence/breath tokens after a run of ``max_run`` are
    decoded (they stay in the LLM's history) but not sent on to the flow."""
    run, reply = 0, None
    while True:
        try:
            item = task.send(reply)
        except StopIteration:
            return
        reply = None
        if isinstance(item, int):
            run = run + 1 if item in silent else 0
            if run <= max_run:
                yield item
        else:
            reply = yield item
