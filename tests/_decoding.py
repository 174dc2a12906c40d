"""Decoding steps of rows of different lengths, to compare two ways of computing them (the LLMs'
captured step graphs against their eager steps)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Forward = Callable[[torch.Tensor, object], tuple[torch.Tensor, object]]


def decode_rows(
    forward: Forward, new_cache: Callable[[], object], width: int
) -> tuple[list[torch.Tensor], list]:
    """Three rows prefilled with 5, 9 and 14 positions, then three rounds of steps of two rows, one
    row and all three (caches growing at different lengths); ``forward(x, cache_or_caches)`` is
    the network's cached forward. Returns every step's output and the caches."""
    g = torch.Generator().manual_seed(0)
    outs = []
    with torch.inference_mode():
        caches = []
        for length in (5, 9, 14):
            cache = new_cache()
            forward(torch.randn(1, length, width, generator=g), cache)
            caches.append(cache)
        for _ in range(3):
            x = torch.randn(3, 1, width, generator=g)
            outs.append(forward(x[:2], caches[:2])[0])
            outs.append(forward(x[:1], caches[:1])[0])
            outs.append(forward(x, caches)[0])
    return outs, caches


def assert_same_decoding(
    a: tuple[list[torch.Tensor], list], b: tuple[list[torch.Tensor], list]
) -> None:
    """Two ``decode_rows`` runs computed the same floats: every output and every cached row."""
    for out_a, out_b in zip(a[0], b[0], strict=True):
        assert torch.equal(out_a, out_b)
    for cache_a, cache_b in zip(a[1], b[1], strict=True):
        assert cache_a.length == cache_b.length
        for layer_a, layer_b in zip(cache_a.buffers, cache_b.buffers, strict=True):
            for buffer_a, buffer_b in zip(layer_a, layer_b, strict=True):
                assert torch.equal(buffer_a.valid(), buffer_b.valid())
