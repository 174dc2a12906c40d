"""A voice's prompt through the streaming flow, computed once and shared by all its streams.

The v2/v3 flows stream with chunk-causal attention and fixed noise, so everything the flow computes
for the prompt's whole chunks (those whose look-ahead tokens are still prompt tokens) depends on
the voice alone: encoder and U-Net/DiT keys and values at every Euler step. A stream would spend
most of its first chunk recomputing them (CosyVoice2, 5 s prompt, 2 cores: ~7 s of ~16 s). Here
the first stream of a voice computes them once (``stream_step`` with no new tokens), and every
stream of that voice forks from the result: the large attention history is shared read-only (see
``GrowingBuffer.fork``), so a stream holds only its own frames and starts at the prompt's last,
partial chunk.

Entries are keyed by the prompt's content (speech tokens, mel, speaker embedding), so a saved voice
and the same recording uploaded again both hit, and kept least-recently-used within a byte budget
(CosyVoice2 float32: ~4.5 MB per prompt frame, ~1 GB for a 5 s prompt; bfloat16 half that). A
prompt bigger than the budget is primed per stream, as without the cache.

Priming ahead of any stream (``prime``: a voice just saved, or saved voices when a server starts)
computes only what can be kept: nothing with a budget of 0, nor a prompt whose size, estimated
from the bytes per primed token (measured on the prompts primed so far, or once on a probe of a
few chunks: ``_probe``), exceeds the budget (without eviction: the room the kept voices leave).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import threading
import weakref
from typing import Any

import torch

from ..networks.cache import MIN_CAPACITY
from .common import ModelInputs

DEFAULT_BUDGET_BYTES = 2 << 30


class PromptFlowCache:
    """Primed flow streams per voice, least recently used first out, within ``budget_bytes``."""

    def __init__(
        self, budget_bytes: int = DEFAULT_BUDGET_BYTES, cache_dtype: torch.dtype | None = None
    ) -> None:
        """cache_dtype: the dtype of every stream's flow keys/values (``flow.new_stream``)."""
        if budget_bytes < 0:
            raise ValueError("the prompt cache budget must be at least 0 bytes")
        self.budget_bytes = budget_bytes
        self.cache_dtype = cache_dtype
        self._entries: collections.OrderedDict[bytes, tuple[Any, int]] = collections.OrderedDict()
        self._priming: dict[bytes, threading.Lock] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0  # misses: prompts computed through the flow (not the probe)
        self.probes = 0  # size probes computed (``_probe``: once, before a prompt's size is known)
        # the most a primed prompt took per token primed so far (0: none measured yet), and the
        # probe's figure (used until then)
        self._bytes_per_token = 0.0
        self._probed_bytes_per_token = 0.0
        self._short: dict[int, int] = {}  # tokens primed -> bytes, of prompts too short for that
        self._geometries: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._probing = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._kept_bytes()

    def _kept_bytes(self) -> int:  # the caller holds the lock
        return sum(size for _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stream(self, flow: torch.nn.Module, inputs: ModelInputs) -> Any:
        """A new flow stream for this prompt with its prompt chunks already computed. A prompt
        not kept is forked too: its frames are the voice's, a prefix the stream reads, so the
        stream's memory budget (``cache_budget``) counts its own frames alone, as with a kept
        voice (counted as its own, they froze the stream at its first piece)."""
        template, primed = self._template(flow, inputs)
        return (primed if template is None else template).fork()

    def prime(self, flow: torch.nn.Module, inputs: ModelInputs, evict: bool = True) -> bool:
        """Compute this prompt's part ahead of its streams (e.g. when a voice is saved); False
        when it is not kept (its streams then compute it themselves). Nothing that could not be
        kept is computed: not with a budget of 0, nor when the prompt's estimated size (see
        ``estimate``) exceeds the budget or, without ``evict``, the room the kept voices leave.
        Without ``evict`` (voices prepared ahead of any request, newest first, when a server
        starts) a kept one goes first out, before those prepared earlier."""
        return self._template(flow, inputs, evict, ahead=True)[0] is not None

    def estimate(self, flow: torch.nn.Module, inputs: ModelInputs) -> int:
        """The bytes this prompt's primed part would take: the bytes per primed token measured
        so far (before any, on a probe: ``_probe``) times the tokens it primes (its whole chunks
        with their look-ahead); a prompt that primes fewer than ``MIN_CAPACITY`` tokens holds
        spare rows too, as many as the short prompts primed so far did (before any: at most
        ``MIN_CAPACITY`` tokens' worth)."""
        per_token = self._bytes_per_token or self._probe(flow, inputs)
        look, size = self._geometry(flow, inputs)
        primed = max(inputs.flow_prompt_speech_token.shape[1] - look, 0) // size * size
        spare = 0.0
        if 0 < primed < MIN_CAPACITY:
            # a cache's spare rows only go as its first write grows: a shorter prompt's spare
            # bounds this one's (before any: MIN_CAPACITY rows per cache at most)
            spare = per_token * MIN_CAPACITY
            with self._lock:
                shorter = [tokens for tokens in self._short if tokens <= primed]
                if shorter:
                    tokens = max(shorter)
                    spare = self._short[tokens] - per_token * tokens
        return math.ceil(per_token * primed + max(spare, 0.0))

    def _template(
        self, flow: torch.nn.Module, inputs: ModelInputs, evict: bool = True, ahead: bool = False
    ) -> tuple[Any, Any]:
        """(the kept template, None), or (None, a primed stream) when it is not kept; (None,
        None) when primed ``ahead`` of its streams and not computed, as it could not be kept
        (by its estimated size; without ``evict``, beside the voices kept)."""
        if self.budget_bytes == 0:
            if ahead:
                return None, None
            with self._lock:
                self.misses += 1
            return None, _prime(flow, inputs, self.cache_dtype)
        key = _key(inputs)
        with self._lock:
            priming = self._priming.setdefault(key, threading.Lock())
        kept = False
        try:
            with priming:  # streams of one voice arriving together prime it once
                with self._lock:
                    entry = self._entries.get(key)
                    if entry is not None:
                        self._entries.move_to_end(key)
                        self.hits += 1
                        kept = True
                        return entry[0], None
                if ahead:
                    expected = self.estimate(flow, inputs)
                    with self._lock:
                        room = self.budget_bytes - (0 if evict else self._kept_bytes())
                    if expected > room:
                        return None, None
                with self._lock:
                    self.misses += 1
                primed = _prime(flow, inputs, self.cache_dtype)
                template = primed.fork()  # the prefix alone, compacted
                size = template.cache_bytes(shared=True)
                self._measured(size, primed)
                if size > self.budget_bytes:
                    return None, primed
                with self._lock:
                    if not evict and self._kept_bytes() + size > self.budget_bytes:
                        return None, primed
                    self._entries[key] = (template, size)
                    if not evict:  # prepared ahead: out before the voices prepared earlier
                        self._entries.move_to_end(key, last=False)
                    while self._kept_bytes() > self.budget_bytes:
                        old, _ = self._entries.popitem(last=False)
                        if old != key:
                            self._priming.pop(old, None)
                kept = key in self._entries
                return template, None
        finally:
            if not kept:
                with self._lock:
                    self._priming.pop(key, None)

    def _geometry(self, flow: torch.nn.Module, inputs: ModelInputs) -> tuple[int, int]:
        """``_chunk_geometry`` of ``flow``, worked out once."""
        with self._lock:
            known = self._geometries.get(flow)
        if known is None:
            known = _chunk_geometry(flow, inputs)
            with self._lock:
                self._geometries[flow] = known
        return known

    def _measured(self, size: int, primed: Any) -> None:
        """Learn from a prompt just primed: the bytes per primed token where its caches' first
        writes took exactly their rows, else (fewer than ``MIN_CAPACITY`` tokens: spare rows
        too) its size, for the estimates of short prompts."""
        tokens = getattr(primed, "tokens_done", 0)
        with self._lock:
            if tokens >= MIN_CAPACITY:
                self._bytes_per_token = max(self._bytes_per_token, size / tokens)
            elif tokens > 0:
                self._short[tokens] = max(self._short.get(tokens, 0), size)

    def _probe(self, flow: torch.nn.Module, inputs: ModelInputs) -> float:
        """Bytes per primed token, measured once (the first time a prompt is primed ahead before
        any was measured) on a prompt of a few whole chunks, just enough for the caches' first
        writes to be exact (``MIN_CAPACITY`` tokens primed): this prompt's first tokens (repeated
        where it is shorter). CosyVoice2: ~3 s of prompt, a tenth of a 30 s prompt's cost."""
        with self._probing:
            if self._probed_bytes_per_token:
                return self._probed_bytes_per_token
            tokens, feat = inputs.flow_prompt_speech_token, inputs.prompt_speech_feat
            if tokens.shape[1] == 0 or feat.shape[1] == 0:
                return 0.0  # nothing to prime
            look, size = self._geometry(flow, inputs)
            count = look + size * -(-MIN_CAPACITY // size)
            ratio = max(1, round(feat.shape[1] / tokens.shape[1]))  # mel frames per token
            probe = dataclasses.replace(
                inputs,
                flow_prompt_speech_token=_repeated(tokens, count),
                prompt_speech_feat=_repeated(feat, count * ratio),
            )
            primed = _prime(flow, probe, self.cache_dtype)
            with self._lock:
                self.probes += 1
            done = getattr(primed, "tokens_done", 0)
            measured = primed.fork().cache_bytes(shared=True) / max(done, 1)
            self._probed_bytes_per_token = measured
            return measured


def _prime(flow: torch.nn.Module, inputs: ModelInputs, cache_dtype: torch.dtype | None) -> Any:
    with torch.inference_mode():
        state = flow.new_stream(
            inputs.flow_prompt_speech_token,
            inputs.prompt_speech_feat,
            inputs.flow_embedding,
            cache_dtype=cache_dtype,
        )
        empty = inputs.flow_prompt_speech_token[:, :0]
        flow.stream_step(state, empty)  # the prompt's whole chunks; no mel comes out
    return state


def _key(inputs: ModelInputs) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    for tensor in (
        inputs.flow_prompt_speech_token,
        inputs.prompt_speech_feat,
        inputs.flow_embedding,
    ):
        data = tensor.detach().cpu().contiguous()
        digest.update(repr((tuple(data.shape), str(data.dtype))).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.digest()


def _chunk_geometry(flow: torch.nn.Module, inputs: ModelInputs) -> tuple[int, int]:
    """(look-ahead tokens, tokens per chunk) of a streaming flow: a stream computes its tokens in
    whole chunks counted from the prompt's first token, each once its look-ahead tokens exist."""
    with torch.inference_mode():
        state = flow.new_stream(
            inputs.flow_prompt_speech_token[:, :0],
            inputs.prompt_speech_feat[:, :0],
            inputs.flow_embedding,
        )
    first = flow.stream_tokens_needed(state, 0)  # the first chunk and its look-ahead
    look = getattr(flow, "pre_lookahead_len", 0)
    return look, max(first - look, 1)


def _repeated(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``rows`` [1, n, ...] repeated along dim 1 to ``count`` rows."""
    times = -(-count // rows.shape[1])
    return rows.repeat(1, times, *([1] * (rows.dim() - 2)))[:, :count]
