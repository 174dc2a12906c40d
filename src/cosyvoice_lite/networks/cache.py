"""The one cache type of every network that decodes or streams incrementally.

``GrowingBuffer`` holds per-position rows along a time axis (the second-to-last dimension) and
grows with one policy; ``KVCache`` is a decoder's set of them for one sequence (every layer's
keys and values; the v1 LLM's projected relative-position rows are the same for every sequence
and live in one table, ``conformer.ProjectedPositions``, built of these buffers). The incremental flows
(v2 U-Net and encoders, v3 DiT) keep their attention history in the same buffers.

A cache belongs to one request (whisper's decoding task owns its cache the same way): batched
decoding steps several requests' caches together, each row attending over its own cache, so a row
never depends on the lengths or contents of the others and needs no padding mask.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections.abc import Sequence

import torch

from .attention import chunk_keep, sees_all_before

MIN_CAPACITY = 64
BEFORE_PARTS = 2  # what a reader attends before its new keys: the shared prefix, its own rows
MAPPED_BYTES = 128 << 10  # CPU buffers this large or larger get pages of their own from the OS


def _map_budget() -> int:
    """How many buffers may be mappings at once: half the kernel's per-process limit on mappings
    (``vm.max_map_count``, 65,530 by default; a stream holds ~2,200 buffers), the rest left to
    the allocator and libraries. 0 where the limit cannot be read (not Linux): the heap only."""
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read()) // 2
    except (OSError, ValueError):
        return 0


class _Mappings:
    """The live count of mapped buffers, within ``_map_budget()``."""

    budget = _map_budget()
    live = 0
    lock = threading.Lock()

    @classmethod
    def take(cls) -> bool:
        with cls.lock:
            if cls.live >= cls.budget:
                return False
            cls.live += 1
            return True

    @classmethod
    def give_back(cls) -> None:
        with cls.lock:
            cls.live -= 1


def _empty(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer on ``like``'s device; on a CPU a large one is an anonymous
    mapping of its own, so that once freed (a regrown buffer, an ended stream) its pages go
    straight back to the OS. From the allocator's heap, which serves allocations up to 32 MB once
    its threshold has grown, a stream's ~2,200 buffers regrowing together left the outgrown ones
    as holes that only smaller allocations reuse: a 15 s CosyVoice2 float32 stream peaked 5,633
    MiB above its voice against 4,694 MiB mapped, in 100 s against 89 s (same host state)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if like.device.type != "cpu" or nbytes < MAPPED_BYTES or not _Mappings.take():
        return like.new_empty(shape, dtype=dtype)
    try:
        pages = mmap.mmap(-1, nbytes)
    except OSError:  # out of mappings or memory: the allocator's heap decides
        _Mappings.give_back()
        return like.new_empty(shape, dtype=dtype)
    weakref.finalize(pages, _Mappings.give_back)  # unmapped with the last tensor on it
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)


class GrowingBuffer:
    """Rows ``[..., capacity, dim]`` of which the first ``length`` along dim -2 are valid.

    A first write of ``MIN_CAPACITY`` rows or more takes exactly its rows (a smaller one
    ``MIN_CAPACITY`` more); when full the buffer grows to the length needed plus a quarter or
    plus the rows just appended, whichever is more, rounded up to ``granule`` positions:
    amortised O(1) per position, at most ~25% or one append of unused capacity, and callers
    that append whole chunks reallocate at most every other chunk.
    Each reallocation copies the rows and touches fresh pages: with a quarter alone, a streamed
    CosyVoice2 chunk regrew every cache at its first chunks (~77,000 page faults in one chunk
    call, 7.1 s on one thread against 4.2 s). ``dtype`` stores the rows in another precision
    (e.g. float16 keys and values of a float32 run, half the memory); reads convert back to the
    dtype written.

    ``fork()`` gives a buffer that starts with this one's rows as a read-only ``shared`` prefix,
    held once for every fork (a voice's prompt frames, cached per voice): a fork stores and returns
    only the rows written after the prefix, and its reader attends over ``parts()`` too (see
    ``attention.attention``'s ``prefix``). A ``frozen`` buffer stores nothing more: ``append``
    hands the rows back, and its stored rows join ``parts()`` (a stream past its memory budget).
    """

    __slots__ = ("data", "length", "dtype", "granule", "shared", "frozen")

    def __init__(self, dtype: torch.dtype | None = None, granule: int = 1) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0  # valid positions, the shared prefix included
        self.dtype = dtype
        self.granule = max(granule, 1)
        self.shared: torch.Tensor | None = None  # read-only rows before the own ones
        self.frozen = False

    @property
    def shared_length(self) -> int:
        return 0 if self.shared is None else self.shared.size(-2)

    def write(self, start: int, rows: torch.Tensor) -> torch.Tensor:
        """Store ``rows`` [..., n, dim] at positions ``start .. start + n`` (everything after is
        dropped); returns the valid rows after the shared prefix (all of them in a buffer that was
        not forked) in the dtype of ``rows``."""
        self.store(start, rows)
        return self.valid().to(rows.dtype)

    def store(self, start: int, rows: torch.Tensor) -> None:
        """``write`` without reading back: in a buffer of another dtype, that read converts every
        row stored so far."""
        self.reserve(start, rows)
        begin = start - self.shared_length
        self.data[..., begin : begin + rows.size(-2), :] = rows

    def reserve(self, start: int, like: torch.Tensor) -> torch.Tensor:
        """Room for ``like.size(-2)`` rows (shaped as ``like``) at positions ``start ..`` (those
        after are dropped); returns the valid rows after the shared prefix, those new ones last,
        for the caller to fill in place (a captured graph writes its new keys and values there)."""
        offset = self.shared_length
        if start < offset:
            raise ValueError(f"position {start} is in the shared prefix ({offset} rows)")
        begin, end = start - offset, start - offset + like.size(-2)
        capacity = 0 if self.data is None else self.data.size(-2)
        if end > capacity:
            if self.data is None:
                # a large first write (a prompt, a prefill) exactly: a primed prompt then forks
                # without a copy (a copy of CosyVoice2's ~1 GB of prompt caches took 1.7-2.1 s
                # of page faults); a small one (a stream's first chunk) with room for more
                grown_to = end if end >= MIN_CAPACITY else end + MIN_CAPACITY
            else:  # the next append of this size fits too
                grown_to = end + max(end // 4, like.size(-2))
            grown_to = -(-grown_to // self.granule) * self.granule
            shape = (*like.shape[:-2], grown_to, like.size(-1))
            grown = _empty(shape, self.dtype or like.dtype, like)
            if self.data is not None and begin > 0:
                grown[..., :begin, :] = self.data[..., :begin, :]
            self.data = grown
        self.length = start + like.size(-2)
        return self.data[..., :end, :]

    def append(self, rows: torch.Tensor) -> torch.Tensor:
        """Store ``rows`` after the valid ones and return the rows a reader sees next to
        ``parts()``: the own rows (new ones included), or, when frozen, ``rows`` alone."""
        if self.frozen:
            return rows
        return self.write(self.length, rows)

    def parts(self) -> list[torch.Tensor]:
        """The rows before those ``append`` returns: the shared prefix, and once frozen the rows
        stored until then."""
        parts = [] if self.shared is None else [self.shared]
        if self.frozen and self.length > self.shared_length:
            parts.append(self.valid())
        return parts

    def valid(self) -> torch.Tensor:
        """The valid rows after the shared prefix."""
        if self.data is None:
            raise RuntimeError("empty buffer")
        return self.data[..., : self.length - self.shared_length, :]

    def fork(self) -> GrowingBuffer:
        """A buffer that goes on from this one's rows, which become its shared prefix: every fork
        of this buffer reads the same tensor (compacted once when the buffer has spare capacity,
        so a prefix kept for many streams holds no slack)."""
        if self.frozen or (self.shared is not None and self.length > self.shared_length):
            raise ValueError("a frozen or forked buffer with rows of its own cannot be forked")
        fork = GrowingBuffer(self.dtype, self.granule)
        fork.length = self.length
        if self.shared is not None:
            fork.shared = self.shared
        elif self.length:
            rows = self.valid()
            fork.shared = rows if rows.size(-2) == self.data.size(-2) else rows.clone()
        return fork

    def copy(self) -> GrowingBuffer:
        """An independent copy (for small buffers, where sharing is not worth a two-part read)."""
        copy = GrowingBuffer(self.dtype, self.granule)
        copy.shared, copy.length, copy.frozen = self.shared, self.length, self.frozen
        if self.data is not None:
            copy.data = self.data.clone()
        return copy

    def nbytes(self, shared: bool = False) -> int:
        """Bytes this buffer holds on its own (with ``shared``: and its shared prefix)."""
        own = 0 if self.data is None else self.data.numel() * self.data.element_size()
        if shared and self.shared is not None:
            own += self.shared.numel() * self.shared.element_size()
        return own


class AttentionHistory:
    """What one attention layer of an incremental flow keeps of the frames before a chunk: keys
    and values (stored in ``dtype``, None: as computed; grown in ``granule`` positions) and, for
    relative-position attention, its projected position rows. Per CFG row and Euler step, owned
    by one stream; ``fork`` makes a voice's prompt frames the shared prefix of its streams."""

    __slots__ = ("keys", "values", "positions")

    def __init__(self, dtype: torch.dtype | None = None, granule: int = 1) -> None:
        self.keys = GrowingBuffer(dtype, granule)
        self.values = GrowingBuffer(dtype, granule)
        self.positions = GrowingBuffer()  # relative attention's projected rows (v2 encoders)

    @property
    def length(self) -> int:
        return self.keys.length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append keys/values (positions along dim -2), unless frozen; a reader takes them from
        ``before`` (as stored, see ``joined``)."""
        for buffer, rows in ((self.keys, keys), (self.values, values)):
            if not buffer.frozen:
                buffer.store(buffer.length, rows)

    def freeze(self) -> None:
        """Past the stream's memory budget: read, never extended."""
        self.keys.frozen = self.values.frozen = True

    # An incremental call as a traced graph (graph_capture.py) reads a history as tensors in one
    # layout for every stream: what comes before the new keys (``before``), the dtype the new ones
    # come back in (``rounds_to``) and the chunk mask over all of them (``chunk_bias``); the new
    # keys and values are appended after the graph.

    def before(self, empty: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The keys and the values a reader attends before the new ones, as stored, in
        ``BEFORE_PARTS`` parts each: the shared prefix, then the rows of its own (frozen or
        not); ``empty`` where there are none."""
        return _before(self.keys, empty), _before(self.values, empty)

    def rounds_to(self, computed: torch.dtype) -> torch.dtype | None:
        """The dtype new keys and values of dtype ``computed`` are stored in and read back
        through by ``append`` (None: read as computed, also once frozen)."""
        dtype = self.keys.dtype
        return None if self.keys.frozen or dtype in (None, computed) else dtype

    def chunk_bias(
        self, start: int, n: int, chunk: int, like: torch.Tensor, masked: float
    ) -> torch.Tensor:
        """The additive attention mask [n, length + n] of n new frames from frame ``start``
        against what ``before`` gives and the new ones: 0 where the static chunk mask lets a frame
        attend, ``masked`` elsewhere. All zeros when every new frame sees every key, which adds
        0 to every score: the floats of no mask."""
        keys = self.keys
        total = keys.length + n
        mask = like.new_zeros(n, total)
        if not sees_all_before(start, n, chunk):
            # only over the rows ``append`` returns: the shared prefix and frozen rows are whole
            # earlier chunks, which every new frame sees
            own = n if keys.frozen else keys.length - keys.shared_length + n
            keep = chunk_keep(start, n, start + n, chunk, like.device)[:, -own:]
            # filled in float32, then rounded: -1e10 overflows float16 to -inf, as it did when
            # multiplied there
            bias = torch.zeros(keep.shape, device=like.device).masked_fill_(~keep, masked)
            mask[:, total - own :] = bias.to(like.dtype)
        return mask

    def fork(self, share: bool = True) -> AttentionHistory:
        """Goes on from here. ``share``: the keys/values so far become the fork's shared prefix
        (where they are large); otherwise they are copied (small ones, read whole)."""
        fork = AttentionHistory.__new__(AttentionHistory)
        if share:
            fork.keys, fork.values = self.keys.fork(), self.values.fork()
        else:
            fork.keys, fork.values = self.keys.copy(), self.values.copy()
        fork.positions = self.positions.copy()
        return fork

    def nbytes(self, shared: bool = False) -> int:
        return sum(b.nbytes(shared) for b in (self.keys, self.values, self.positions))


def joined(
    before: Sequence[torch.Tensor], new: torch.Tensor, stored: torch.dtype | None
) -> torch.Tensor:
    """The keys (or values) a row of an incremental call attends: what ``before`` gives, as
    stored, then the ``new`` rows read back through the dtype they are stored in (``stored``,
    see ``AttentionHistory.rounds_to``), all in the dtype of ``new``. One concatenation converts
    each stored part as it copies it (a cast of each part, then a join of the casts, read and
    wrote the history twice)."""
    if stored is not None:
        new = new.to(stored).to(new.dtype)
    parts = [
        p if torch.promote_types(p.dtype, new.dtype) == new.dtype else p.to(new.dtype)
        for p in before
    ]
    return torch.cat([*parts, new], dim=-2)


def _before(buffer: GrowingBuffer, empty: torch.Tensor) -> list[torch.Tensor]:
    shared = empty if buffer.shared is None else buffer.shared
    own = empty if buffer.length == buffer.shared_length else buffer.valid()
    return [shared, own]


class KVCache:
    """A decoder's cache for one sequence: for every layer, a keys and a values buffer
    ``[heads, T, dim]``. A step reserves each layer's new positions at ``length`` and advances
    ``length``; its layers then fill them in place.
    """

    __slots__ = ("num_layers", "buffers", "length")

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.buffers = [(GrowingBuffer(), GrowingBuffer()) for _ in range(num_layers)]
        self.length = 0

    def nbytes(self) -> int:
        return sum(b.nbytes() for layer in self.buffers for b in layer)

    def reserve(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for ``like.size(-2)`` positions ([heads, T, head_dim], the cache's dtype) at
        ``length`` in ``layer``'s keys and values; returns both buffers' valid rows with the new
        positions last, to be filled in place."""
        key_buffer, value_buffer = self.buffers[layer]
        return key_buffer.reserve(self.length, like), value_buffer.reserve(self.length, like)

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, length: int) -> None:
        """Forget the positions from ``length`` on (those a failed step reserved): the next step
        writes its keys and values there again."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        self.length = length


def cache_lengths(caches: list[KVCache], device: torch.device) -> torch.Tensor:
    """Each cache's length [B] (int64) on ``device``, for a decoding step's positions; on CUDA
    copied from pinned memory, so the copy is queued behind the GPU's earlier work rather than
    waiting for it."""
    lengths = torch.tensor([cache.length for cache in caches])
    if device.type == "cuda":
        lengths = lengths.pin_memory()
    return lengths.to(device, non_blocking=True)
