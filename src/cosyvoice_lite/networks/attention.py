"""Scaled dot-product attention of the flow estimators, in the dtype of their weights.

float32 runs torch's ``scaled_dot_product_attention``, the kernel the official code runs, which the
parity tests reproduce bit for bit. With bfloat16/float16 weights there is no parity to keep, and
on a CPU without AMX tiles torch's CPU kernel with a mask is slower there than plain GEMMs around
a softmax (measured on an AMD EPYC Zen 5, CPU time, 2 x 8 heads x 64: 18 ms vs 10 ms at 400
frames; 94 ms vs 103 ms at 1,100 frames), and so it is for a stream's new frames against its
cached prefix (50 queries, 300-900 keys, 8 heads x 64, one or two threads: 1.4-2.6x). The softmax
takes the low-precision scores (torch's CPU kernel accumulates them in float32). With AMX tiles
(Intel Sapphire Rapids on) the fused kernel's bfloat16 products run on them and it is the faster
one (``_fused_bfloat16``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..device import cpu_features


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for [B, H, T, d] tensors; ``mask`` is additive (float) or
    boolean (True = may attend), broadcastable to [B, H, Tq, Tk].

    ``prefix``: (keys, values) pairs [B, H, P, d] every query sees before ``k``/``v`` (a stream's
    shared prompt frames and frozen history, see ``cache.GrowingBuffer``); the mask covers ``k``
    only. The parts are joined and go through one attention call: copying them (a few MB a
    call) costs less than a product and a softmax slice per part (measured, one v2 stream chunk's
    shapes, 2 threads: 1.2-1.9x faster in bfloat16 and float32)."""
    if prefix:
        k, v, mask = _after_prefix(q, k, v, mask, prefix)
    if q.dtype == torch.float32 or q.device.type != "cpu" or _fused_bfloat16(q.dtype):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.matmul(_scores(q, k, mask).softmax(dim=-1), v)


def _fused_bfloat16(dtype: torch.dtype) -> bool:
    """bfloat16 attention by torch's fused kernel, on a CPU with AMX tiles (a property of the
    hardware, read once). Measured on an Intel Xeon with AMX, 2 threads, 2 x 8 heads x 64: 446
    frames 3.2-3.6 ms against 6.1-12.0 ms, a stream's 50 queries on 350-900 keys 0.35-0.98 ms
    against 0.63-2.25 ms; CosyVoice2 bfloat16 streams of a saved voice, 50 tokens, one engine
    alternating both (medians of 3): first audio 4.30 s against 4.61 s alone, 4 streams' wall
    19.6 s against 21.7 s; whole utterances' flow unchanged (4.9-5.2 s both)."""
    return dtype == torch.bfloat16 and cpu_features().amx


def sees_everything(frames: torch.Tensor, length: int, chunk_size: int) -> bool:
    """Whether a frame mask [B, 1, T] (1 = valid) lets every query attend to every key: no padded
    frame and no chunk boundary within ``length``. Attention then takes no mask at all, which is
    exact (the bias would add 0 to every score) and saves adding it to every score. Never while
    a graph is traced for export: the graph keeps its mask for padded inputs."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return (chunk_size <= 0 or length <= chunk_size) and bool(frames.all())


def sees_all_before(start: int, n: int, chunk: int) -> bool:
    """Whether every query frame start..start + n - 1 may attend every key frame before
    start + n under the static chunk mask (``chunk_keep``): the first query's chunk reaches the
    last new frame. Worked out from the integers, so a GPU stream is not waited for."""
    return chunk <= 0 or (start // chunk + 1) * chunk >= start + n


def chunk_keep(start: int, n: int, total: int, chunk: int, device: torch.device) -> torch.Tensor:
    """[n, total] bool: query frame start + i may attend key frame j under the static chunk mask
    of the streaming flows (its own chunk and every earlier one; ``chunk`` <= 0: everything)."""
    if chunk <= 0:
        return torch.ones(n, total, dtype=torch.bool, device=device)
    query = torch.arange(start, start + n, device=device)
    key = torch.arange(total, device=device)
    chunk_end = (torch.div(query, chunk, rounding_mode="trunc") + 1) * chunk
    return key.unsqueeze(0) < chunk_end.unsqueeze(1)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if mask is None:
        return scores
    return scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask


def _after_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values with the prefix parts before them, and the mask widened to see the prefix."""
    keys = torch.cat([*(part.to(q.dtype) for part, _ in prefix), k], dim=-2)
    values = torch.cat([*(part.to(q.dtype) for _, part in prefix), v], dim=-2)
    if mask is not None:  # every query sees the whole prefix
        seen = keys.size(-2) - k.size(-2)
        mask = F.pad(mask, (seen, 0), value=True if mask.dtype == torch.bool else 0.0)
    return keys, values, mask
