"""The one key/value cache type of every decoder: one sequence, every layer, growable.

A cache belongs to one request (whisper's decoding task owns its cache the same way): batched
decoding steps several requests' caches together, each row attending over its own cache, so a row
never depends on the lengths or contents of the others and needs no padding mask.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 64


class KVCache:
    """Per-layer tensors ``[layers, heads, capacity, head_dim]`` for the positions seen so far.

    ``streams`` is how many such tensors each position has: 2 (keys, values), or 3 when the layers
    also cache projected relative-position rows (the v1 LLM). Buffers are allocated on the first
    write with that write's dtype and device, grow by doubling, and are written layer by layer; the
    caller advances ``length`` once every layer has written the new positions.
    """

    __slots__ = ("num_layers", "streams", "tensors", "length")

    def __init__(self, num_layers: int, streams: int = 2) -> None:
        self.num_layers = num_layers
        self.streams = streams
        self.tensors: list[torch.Tensor] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.tensors[0].size(2) if self.tensors else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def write(self, layer: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Store ``new`` ([heads, T, head_dim] each, one per stream) at positions
        ``length .. length + T`` of ``layer``; returns each stream's valid rows of that layer."""
        if len(new) != self.streams:
            raise ValueError(
                f"this cache holds {self.streams} tensors per position, got {len(new)}"
            )
        end = self.length + new[0].size(1)
        self._reserve(end, new)
        out = []
        for buffer, rows in zip(self.tensors, new, strict=True):
            buffer[layer, :, self.length : end] = rows
            out.append(buffer[layer, :, :end])
        return out

    def advance(self, n: int) -> None:
        self.length += n

    def _reserve(self, needed: int, like: tuple[torch.Tensor, ...]) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, MIN_CAPACITY)
        grown = []
        for index, rows in enumerate(like):
            heads, _, dim = rows.shape
            buffer = rows.new_empty(self.num_layers, heads, capacity, dim)
            if self.tensors:
                buffer[:, :, : self.length] = self.tensors[index][:, :, : self.length]
            grown.append(buffer)
        self.tensors = grown
