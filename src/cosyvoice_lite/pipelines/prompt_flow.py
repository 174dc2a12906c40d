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
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Any

import torch

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
        self.hits = self.misses = 0
        self._bytes_per_frame = 0.0  # the most a primed prompt took per mel frame so far

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
        when it is not kept (its streams then compute it themselves): larger than the budget,
        or, without ``evict``, too large for the room the kept voices leave. Without ``evict``
        (voices prepared ahead of any request, newest first, when a server starts) a prompt
        that would not fit by the size of those primed so far is not computed at all, and a
        kept one goes first out, before those prepared earlier."""
        return self._template(flow, inputs, evict)[0] is not None

    def _template(
        self, flow: torch.nn.Module, inputs: ModelInputs, evict: bool = True
    ) -> tuple[Any, Any]:
        """(the kept template, None), or (None, a primed stream) when it is not kept; (None,
        None) when, without ``evict``, it would not fit and was not computed."""
        if self.budget_bytes == 0:
            if not evict:
                return None, None
            with self._lock:
                self.misses += 1
            return None, _prime(flow, inputs, self.cache_dtype)
        key, frames = _key(inputs), max(inputs.prompt_speech_feat.shape[1], 1)
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
                    expected = self._kept_bytes() + self._bytes_per_frame * frames
                    if not evict and expected > self.budget_bytes:
                        return None, None
                    self.misses += 1
                primed = _prime(flow, inputs, self.cache_dtype)
                template = primed.fork()  # the prefix alone, compacted
                size = template.cache_bytes(shared=True)
                with self._lock:
                    self._bytes_per_frame = max(self._bytes_per_frame, size / frames)
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
