"""The flow estimators' attention: float32 is torch's fused kernel (the official's); bfloat16 on
a CPU is products around a softmax, or the fused kernel on a CPU with AMX tiles, with or without a
stream's cached prefix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cosyvoice_lite.device import cpu_features
from cosyvoice_lite.networks.attention import attention, chunk_keep


def _inputs(dtype: torch.dtype, prefix: int, new: int = 6) -> tuple:
    g = torch.Generator().manual_seed(0)

    def rand(frames: int) -> torch.Tensor:
        return torch.randn(2, 4, frames, 16, generator=g).to(dtype)

    parts = [(rand(prefix // 2), rand(prefix // 2)), (rand(prefix - prefix // 2),) * 2]
    return rand(new), rand(new), rand(new), parts


def _reference(q, k, v, mask, parts) -> torch.Tensor:
    """float32 attention over the joined keys/values, the mask widened over the prefix."""
    keys = torch.cat([p for p, _ in parts] + [k], dim=-2).float()
    values = torch.cat([p for _, p in parts] + [v], dim=-2).float()
    seen = keys.size(-2) - k.size(-2)
    mask = F.pad(mask, (seen, 0), value=True)
    return F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask)


@pytest.mark.parametrize("prefix", [0, 10])
def test_float32_with_a_prefix_is_the_fused_kernel_over_the_joined_keys(prefix: int) -> None:
    q, k, v, parts = _inputs(torch.float32, prefix)
    parts = parts if prefix else []
    mask = chunk_keep(4, 6, 6 + 4, 5, q.device)[:, 4:]  # a chunk boundary among the new frames
    got = attention(q, k, v, mask, prefix=parts)
    assert torch.equal(got, _reference(q, k, v, mask, parts))


@pytest.mark.parametrize("prefix", [0, 10])
def test_bfloat16_with_a_prefix_within_rounding_of_float32(prefix: int) -> None:
    q, k, v, parts = _inputs(torch.bfloat16, prefix)
    parts = parts if prefix else []
    mask = chunk_keep(4, 6, 6 + 4, 5, q.device)[:, 4:]
    got = attention(q, k, v, mask, prefix=parts)
    reference = _reference(q, k, v, mask, parts)
    assert got.dtype == torch.bfloat16
    assert (got.float() - reference).abs().max() < 0.03
    # a masked key changes nothing: the last new frame is seen by the second chunk only
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1], v2[:, :, -1] = 100.0, 100.0
    first_chunk = attention(q, k2, v2, mask, prefix=parts)[:, :, :1]
    assert torch.equal(first_chunk, got[:, :, :1])


def test_bfloat16_takes_the_fused_kernel_where_the_cpu_has_amx_tiles() -> None:
    q, k, v, parts = _inputs(torch.bfloat16, 10)
    mask = F.pad(chunk_keep(4, 6, 6 + 4, 5, q.device)[:, 4:], (10, 0), value=True)
    keys = torch.cat([p for p, _ in parts] + [k], dim=-2)
    values = torch.cat([p for _, p in parts] + [v], dim=-2)
    if cpu_features().amx:
        expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    else:  # products around a softmax of the low-precision scores
        scores = torch.matmul(q * q.shape[-1] ** -0.5, keys.transpose(-1, -2))
        expected = torch.matmul(scores.masked_fill(~mask, -torch.inf).softmax(dim=-1), values)
    got = attention(q, k, v, mask[:, 10:], prefix=parts)
    assert torch.equal(got, expected)
