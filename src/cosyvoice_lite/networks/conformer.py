"""ESPnet/WeNet Conformer and Transformer encoders as CosyVoice uses them (inference only).

Parameter names are the official ones (``cosyvoice/transformer/*``), so official checkpoints load
with ``strict=True``. Only the options the official yamls use are supported: a linear input layer
(``linear`` or ``linear_legacy``), ESPnet relative positional encoding (``rel_pos_espnet``) with
relative-position self-attention (``rel_selfattn``), pre-norm layers, and no macaron or
convolution module. Training-only arguments (dropout rates, dynamic chunks, checkpointing) are
accepted and ignored.

Top to bottom: masks, relative positional encoding, input layers, attention, feed-forward,
encoder layers, and the encoders. The layer classes are meant to be reused by
other encoders built from the same parts (e.g. the v2 flow's upsampling Conformer).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.abort import check
from cosyvoice_lite.networks.cache import GrowingBuffer, KVCache, cache_lengths
from cosyvoice_lite.networks.graph_capture import (
    CAPTURED_STEP_ROWS,
    CapturedGraphs,
    StepSlots,
    flat_slots,
    nested_slots,
    trace_step_graphs,
)
from cosyvoice_lite.networks.linear import grouped

# --------------------------------------------------------------------------------------------
# Masks (True = may attend)
# --------------------------------------------------------------------------------------------


def make_pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool mask that is True at padded positions (official ``make_pad_mask``)."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(-1)


def subsequent_chunk_mask(size: int, chunk_size: int, device: torch.device) -> torch.Tensor:
    """[size, size] mask letting each position see its own chunk and every chunk to its left.

    With ``chunk_size == 1`` this is the causal (lower-triangular) mask.
    """
    positions = torch.arange(size, device=device)
    chunk_end = (torch.div(positions, chunk_size, rounding_mode="trunc") + 1) * chunk_size
    return positions.unsqueeze(0) < chunk_end.unsqueeze(1)


def encoder_attention_mask(
    xs_lens: torch.Tensor, max_len: int, static_chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding mask [B, 1, T] and attention mask ([B, T, T] chunked, or the padding mask).

    Reproduces the official ``add_optional_chunk_mask`` for static (non-dynamic) chunks,
    including its fix-up: a query row that may see nothing is allowed to see everything.
    """
    pad_mask = ~make_pad_mask(xs_lens, max_len).unsqueeze(1)  # [B, 1, T]
    if static_chunk_size <= 0:
        att_mask = pad_mask
    else:
        chunk = subsequent_chunk_mask(max_len, static_chunk_size, xs_lens.device)
        att_mask = pad_mask & chunk.unsqueeze(0)  # [B, T, T]
    empty_rows = att_mask.sum(dim=-1) == 0
    if bool(empty_rows.any()):
        att_mask = att_mask.clone()
        att_mask[empty_rows] = True
    return pad_mask, att_mask


# --------------------------------------------------------------------------------------------
# Relative positional encoding (ESPnet "new" variant, official EspnetRelPositionalEncoding)
# --------------------------------------------------------------------------------------------


class EspnetRelPositionalEncoding(nn.Module):
    """Scales the input by sqrt(d_model) and provides sinusoids for signed relative distances.

    Distance ``r = query_position - key_position``. The official keeps a table for |r| < 5000;
    we compute the rows on demand with the same float32 formula, so the values are identical and
    there is no length limit. No parameters or buffers (the official table is a plain attribute).
    """

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)

    def sinusoids(self, distances: torch.Tensor) -> torch.Tensor:
        """[n, d_model] float32 rows: sin at even, cos at odd channels of distance * freq."""
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=distances.device)
            * -(math.log(10000.0) / self.d_model)
        )
        angles = distances.to(torch.float32).unsqueeze(1) * div_term
        pe = torch.zeros(distances.numel(), self.d_model, device=distances.device)
        pe[:, 0::2] = torch.sin(angles)
        pe[:, 1::2] = torch.cos(angles)
        return pe

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(x * sqrt(d), pos_emb)`` with pos_emb [1, 2T-1, d] for distances T-1 .. -(T-1)."""
        size = x.size(1)
        distances = torch.arange(size - 1, -size, -1, device=x.device)
        pos_emb = self.sinusoids(distances).to(x.dtype).unsqueeze(0)
        return x * self.xscale, pos_emb


# --------------------------------------------------------------------------------------------
# Input layers (official LinearNoSubsampling / LegacyLinearNoSubsampling)
# --------------------------------------------------------------------------------------------


class LinearNoSubsampling(nn.Module):
    """``out`` = Linear -> LayerNorm(eps 1e-5) -> Dropout, then the positional encoding."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module):
        super().__init__()
        self.out = nn.Sequential(
            nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(dropout_rate)
        )
        self.pos_enc = pos_enc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(embedded and scaled x, pos_emb)`` for a whole sequence."""
        return self.pos_enc(self.out(x))


class LegacyLinearNoSubsampling(LinearNoSubsampling):
    """Same as LinearNoSubsampling plus a trailing ReLU (used by the v1 LLM's input layer)."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module):
        super().__init__(idim, odim, dropout_rate, pos_enc)
        self.out.append(nn.ReLU())


INPUT_LAYERS = {"linear": LinearNoSubsampling, "linear_legacy": LegacyLinearNoSubsampling}
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU}


# --------------------------------------------------------------------------------------------
# Relative-position multi-head attention (Transformer-XL style, official names)
# --------------------------------------------------------------------------------------------


# Queries whose attention over a whole sequence is computed at once (the official's operations);
# a longer sequence's go a block at a time (the same floats per row, measured: float32, CPU), at
# most this many rows and ATTENTION_BLOCK_SCORES scores (batch x heads x rows x keys: 32 MB in
# float32), at least ATTENTION_BLOCK_MIN_ROWS rows; abort.check between blocks. A block bounds
# both the memory (all at once, a 6,000-token CosyVoice2 utterance's scores were 11.7 GB) and
# the time before a cancelled or closing computation stops: a whole layer of that utterance's
# up-encoder took 6-14 s on 2 cores, blocks of 1,024 rows 1-2 s each, blocks of this budget
# (174 rows there) a fraction of a second.
WHOLE_ATTENTION_ROWS = 1024
ATTENTION_BLOCK_SCORES = 2**23
ATTENTION_BLOCK_MIN_ROWS = 64


def attention_block_rows(batch: int, heads: int, keys: int) -> int:
    """The queries per block of a long sequence's attention (``WHOLE_ATTENTION_ROWS``)."""
    rows = ATTENTION_BLOCK_SCORES // max(1, batch * heads * keys)
    return min(WHOLE_ATTENTION_ROWS, max(ATTENTION_BLOCK_MIN_ROWS, rows))


def _gather_by_distance(scores_by_row: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """Pick, for every (query i, key j), the positional score stored at column ``row_of[..., i, j]``
    (``row_of`` broadcasts over the leading dims of ``scores_by_row``).

    This is the ESPnet ``rel_shift`` written as an explicit gather.
    """
    index = row_of.expand(*scores_by_row.shape[:-1], row_of.size(-1))
    return torch.gather(scores_by_row, -1, index)


class RelPositionMultiHeadedAttention(nn.Module):
    """score(i, j) = ((q_i + pos_bias_u) . k_j + (q_i + pos_bias_v) . linear_pos(pe(i - j))) / sqrt(d_k)."""

    linear_groups = {"qkv": ("linear_q", "linear_k", "linear_v")}
    attention_dtype: torch.dtype | None = None  # forward_cached's cache + attention dtype
    # forward_cached in one fused call (``_weighted_values``); set at load unless the network
    # keeps the official's floats (precision.fuse_cached_attention)
    fused_cached: bool = False

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True):
        super().__init__()
        if n_feat % n_head != 0:
            raise ModelDirError(f"attention size {n_feat} is not divisible by {n_head} heads")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, h*d_k] -> [B, h, T, d_k]."""
        return x.view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bd: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Content scores + positional scores ``bd``, masked softmax, weighted values, output proj."""
        return self.linear_out(self._weighted_values(q, k, v, bd, keep))

    def _weighted_values(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bd: torch.Tensor,
        keep: torch.Tensor,
        fused: bool = False,
    ) -> torch.Tensor:
        """softmax(((q + u) k^T + bd) / sqrt(d_k), masked) v, heads joined: [B, T1, h * d_k].

        ``fused``: in one call of torch's fused attention, the positional scores its additive
        mask, for networks with no official floats to reproduce (``precision.fuse_cached_attention``;
        exact float32 keeps the official's operations bit for bit); it differs by float32 rounding
        (~1e-6). Only where every query sees at least one key (the cached, causal
        attention), so that the official's re-zeroing of fully masked rows changes nothing. Why:
        an LLM step's separate products, softmax and masking cost ~0.47 ms a layer on 2 threads
        (CosyVoice-300M, one query on 200 keys, 16 heads x 64) against ~0.26 ms."""
        content_query = q + self.pos_bias_u.unsqueeze(1)
        if fused:
            return self._fused(content_query, k, v, self._fused_bias(bd, keep))
        scores = (torch.matmul(content_query, k.transpose(-2, -1)) + bd) / math.sqrt(self.d_k)
        drop = ~keep
        # Softmax then re-zeroing masked entries, as the official does (fully masked rows: 0)
        attn = torch.softmax(scores.masked_fill(drop, -float("inf")), dim=-1)
        return self._joined_heads(torch.matmul(attn.masked_fill(drop, 0.0), v))

    def _fused_bias(self, bd: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The positional scores as the fused call's additive mask: scaled, -inf where masked."""
        return (bd * (1.0 / math.sqrt(self.d_k))).masked_fill(~keep, -torch.inf)

    def _fused(
        self, content_query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        return self._joined_heads(F.scaled_dot_product_attention(content_query, k, v, bias))

    def _joined_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, T, d_k] -> [B, T, h * d_k]."""
        return x.transpose(1, 2).reshape(x.size(0), -1, self.h * self.d_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """Self-attention over a whole sequence.

        x [B, T, D]; mask bool [B, 1 or T, T] (True = attend); pos_emb [1, 2T-1, D] for
        distances T-1 .. -(T-1) (from EspnetRelPositionalEncoding.forward).
        """
        size = x.size(1)
        q, k, v = (self._heads(y) for y in grouped(self, "qkv", x))
        p = self._heads(self.linear_pos(pos_emb))  # [1, h, 2T-1, d_k]
        if size <= WHOLE_ATTENTION_ROWS:
            return self._attend(q, k, v, self._positional_scores(q, p, 0, size), mask.unsqueeze(1))
        # a long utterance's queries a block at a time: the scores of all of them at once are
        # h x T x (2T - 1) floats (a 6,000-token CosyVoice2 utterance: 11.7 GB, then more)
        keep = mask.unsqueeze(1)
        step = attention_block_rows(x.size(0), self.h, size)
        blocks = []
        for start in range(0, size, step):
            if start:
                check(f"attention block at query {start} of {size}")  # (networks.abort)
            end = min(start + step, size)
            rows = keep if keep.size(2) == 1 else keep[:, :, start:end]
            bd = self._positional_scores(q[:, :, start:end], p, start, size)
            blocks.append(self._weighted_values(q[:, :, start:end], k, v, bd, rows))
        return self.linear_out(torch.cat(blocks, dim=1))

    def _positional_scores(
        self, q: torch.Tensor, p: torch.Tensor, start: int, size: int
    ) -> torch.Tensor:
        """(q + pos_bias_v) . p(i - j) for the queries i = start .. start + len(q) - 1 and every
        key j < ``size``: [B, h, len(q), size]. Row m of ``p`` holds distance size-1-m, so
        distance i-j sits at row size-1-i+j; only the rows these queries reach are used."""
        end = start + q.size(2)
        reached = p[:, :, size - end : 2 * size - 1 - start]  # rows size-1-i+j, i < end, j < size
        bd_by_row = torch.matmul(q + self.pos_bias_v.unsqueeze(1), reached.transpose(-2, -1))
        queries = torch.arange(start, end, device=q.device)
        keys = torch.arange(size, device=q.device)
        row_of = (end - 1) - queries.unsqueeze(1) + keys.unsqueeze(0)
        return _gather_by_distance(bd_by_row, row_of)

    def projected_positions(self, sinusoids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``linear_pos`` of relative-distance sinusoids [n, D] (in the weights' dtype), as heads
        [h, n, d_k] in the attention dtype (``ProjectedPositions``' rows)."""
        return self._heads(self.linear_pos(sinusoids.unsqueeze(0)).to(dtype))[0]

    def forward_cached(
        self,
        x: torch.Tensor,
        slots: Sequence[tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        distances: CachedDistances,
    ) -> torch.Tensor:
        """Causal self-attention of new positions x [B, T1, D] against each row's cached ones.

        ``slots``: each row's cached keys and values [h, T, d_k] with room for its T1 new
        positions last (``KVCache.reserve``), which this call fills in place; ``positions``
        [h, P, d_k] are the projected positional rows of distances 0 .. P-1
        (``ProjectedPositions``), P at least every row's new length; ``distances``: the step's
        (``CachedDistances``). Projections and positional scores run on all rows at once (the
        positional rows are the same for every row: one product, not one per row); attention
        runs per row over its own cache. A row's length is read from its slots, not from Python
        numbers, so that a traced step serves every length (``_Encoder.capture_graphs``)."""
        chunk = x.size(1)
        dtype = self.attention_dtype or x.dtype
        q_all, k_all, v_all = (self._heads(y.to(dtype)) for y in grouped(self, "qkv", x))
        bd = self._cached_positional_scores(q_all, positions, distances)
        if self.fused_cached:  # what does not depend on a row's cache, once for the batch
            content_query = q_all + self.pos_bias_u.unsqueeze(1)
            bias = self._fused_bias(bd, distances.keep.unsqueeze(1))
        rows = []
        for row, (keys, values) in enumerate(slots):
            keys[:, -chunk:].copy_(k_all[row])
            values[:, -chunk:].copy_(v_all[row])
            end = keys.size(-2)
            k, v, own = keys.unsqueeze(0), values.unsqueeze(0), slice(row, row + 1)
            if self.fused_cached:
                rows.append(self._fused(content_query[own], k, v, bias[own, :, :, :end]))
            else:
                keep = distances.keep[row, :, :end]
                rows.append(self._weighted_values(q_all[own], k, v, bd[own, :, :, :end], keep))
        return self.linear_out((rows[0] if len(rows) == 1 else torch.cat(rows)).to(x.dtype))

    def _cached_positional_scores(
        self, q: torch.Tensor, positions: torch.Tensor, distances: CachedDistances
    ) -> torch.Tensor:
        """Positional scores bd [B, h, T1, L] of every row's new positions q [B, h, T1, d_k]
        against key positions 0 .. L-1 (``CachedDistances``)."""
        rows, heads, chunk, _ = q.shape
        longest = distances.keep.size(-1)
        p = positions[:, :longest].transpose(-2, -1)  # [h, d_k, L]
        query = q + self.pos_bias_v.unsqueeze(1)
        if rows == 1:
            by_distance = torch.matmul(query[0], p).unsqueeze(0)
        else:  # the rows next to each other in one product per head
            by_row = query.transpose(0, 1).reshape(heads, rows * chunk, -1)
            by_distance = torch.matmul(by_row, p).view(heads, rows, chunk, -1).transpose(0, 1)
        # Column r of by_distance is the score for distance r = 0 .. L-1.
        return _gather_by_distance(by_distance, distances.clamped.unsqueeze(1))


class CachedDistances(NamedTuple):
    """The query-key distances of one cached step, the same in every layer: B rows (caches) of
    T1 new positions each, row b's first at its cache's length, against key positions 0 .. L-1
    (L the longest row's new length). ``keep`` [B, T1, L] is the causal mask (the official LLM
    passes a tril mask), ``clamped`` the distances with the masked ones at 0 (the column of the
    positional scores to gather). Worked out once a step, not per row and layer
    (benchmarks/README.md: with the positional product, ~0.2 ms a row and layer in a
    CosyVoice-300M step of 4 rows)."""

    keep: torch.Tensor
    clamped: torch.Tensor

    @classmethod
    def of(cls, caches: list[KVCache], chunk: int, device: torch.device) -> CachedDistances:
        """The distances of ``chunk`` new positions after each of ``caches``."""
        query = cache_lengths(caches, device).view(-1, 1, 1)
        if chunk > 1:
            query = query + torch.arange(chunk, device=device).view(1, chunk, 1)
        longest = max(cache.length for cache in caches) + chunk
        distance = query - torch.arange(longest, device=device)  # [B, T1, L]
        return cls(distance >= 0, distance.clamp(min=0))


# --------------------------------------------------------------------------------------------
# Feed-forward and encoder layers
# --------------------------------------------------------------------------------------------


class PositionwiseFeedForward(nn.Module):
    """w_2(activation(w_1(x)))."""

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float, activation: nn.Module):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class _PreNormLayer(nn.Module):
    """x + attn(norm(x)), then x + ff(norm(x)). Subclasses only name the two LayerNorms."""

    self_attn: RelPositionMultiHeadedAttention
    feed_forward: PositionwiseFeedForward

    def _norms(self) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        attn_norm, ff_norm = self._norms()
        x = x + self.self_attn(attn_norm(x), mask, pos_emb)
        return x + self.feed_forward(ff_norm(x))

    def forward_cached(
        self,
        x: torch.Tensor,
        slots: Sequence[tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        distances: CachedDistances,
    ) -> torch.Tensor:
        attn_norm, ff_norm = self._norms()
        x = x + self.self_attn.forward_cached(attn_norm(x), slots, positions, distances)
        return x + self.feed_forward(ff_norm(x))


class TransformerEncoderLayer(_PreNormLayer):
    """Official TransformerEncoderLayer (pre-norm): LayerNorms ``norm1`` (attention), ``norm2`` (FF)."""

    def __init__(
        self,
        size: int,
        self_attn: RelPositionMultiHeadedAttention,
        feed_forward: PositionwiseFeedForward,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm1 = nn.LayerNorm(size, eps=1e-12)
        self.norm2 = nn.LayerNorm(size, eps=1e-12)

    def _norms(self) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        return self.norm1, self.norm2


class ConformerEncoderLayer(_PreNormLayer):
    """Official ConformerEncoderLayer without macaron FF or conv module: ``norm_mha``, ``norm_ff``.

    With those two options off (as in every official yaml) it computes exactly what the
    Transformer layer does; only the parameter names differ.
    """

    def __init__(
        self,
        size: int,
        self_attn: RelPositionMultiHeadedAttention,
        feed_forward: PositionwiseFeedForward,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def _norms(self) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        return self.norm_mha, self.norm_ff


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


POSITION_BLOCK = 256  # distances projected in one call (ProjectedPositions)


class ProjectedPositions:
    """Every layer's projected positional rows for the relative distances 0, 1, ... of cached
    decoding ([h, n, d_k] each, ``linear_pos`` of the sinusoids), shared by all sequences.

    They are a function of the weights alone (fixed once loaded). Kept per cache before, they
    took a third of it (keys, values, positions) and one more product per layer and decoding
    step (full-size v1-SFT, median step, 3 alternating processes each: float32 29.7-30.7 against
    30.9-34.6 ms, bfloat16 18.8-18.9 against 19.9-20.9, int8 10.9-11.7 against 12.1-13.9;
    benchmarks/README.md). The table grows in whole blocks of ``POSITION_BLOCK`` distances, each
    projected in one call, so a row holds the same floats whichever sequence reached it first; at
    most as long as the longest sequence decoded (57 KB per distance for the full-size v1 LLM in
    float32), made again if the dtype or device of the layers changes."""

    def __init__(self) -> None:
        self._rows: list[GrowingBuffer] = []
        self._kind: tuple[torch.dtype, torch.device] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a lock cannot be copied or pickled; a fresh one is made
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def covering(self, encoder: _Encoder, end: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's rows for at least the distances 0 .. end-1; ``like``: the layers' input
        (its dtype is what ``linear_pos`` takes)."""
        with self._lock:
            if self._kind != (like.dtype, like.device):
                self._rows = [GrowingBuffer() for _ in encoder.encoders]
                self._kind = (like.dtype, like.device)
            have = self._rows[0].length
            if end > have:
                need = -(-end // POSITION_BLOCK) * POSITION_BLOCK
                with torch.inference_mode():
                    self._grow(encoder, have, need, like)
            return [buffer.valid() for buffer in self._rows]

    def _grow(self, encoder: _Encoder, have: int, need: int, like: torch.Tensor) -> None:
        for start in range(have, need, POSITION_BLOCK):
            distances = torch.arange(start, start + POSITION_BLOCK, device=like.device)
            sinusoids = encoder.embed.pos_enc.sinusoids(distances).to(like.dtype)
            for layer, buffer in zip(encoder.encoders, self._rows, strict=True):
                attn = layer.self_attn
                rows = attn.projected_positions(sinusoids, attn.attention_dtype or like.dtype)
                buffer.store(start, rows)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelDirError(f"unsupported encoder configuration: {message}")


class _Encoder(nn.Module):
    """Input layer -> N pre-norm layers -> ``after_norm`` (official BaseEncoder, inference only)."""

    encoders: nn.ModuleList

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_layer: str,
        pos_enc_layer_type: str,
        normalize_before: bool,
        static_chunk_size: int,
        use_dynamic_chunk: bool,
        global_cmvn: nn.Module | None,
        selfattention_layer_type: str,
        activation_type: str,
    ):
        super().__init__()
        _require(
            input_layer in INPUT_LAYERS,
            f"input_layer {input_layer!r} (use 'linear' or 'linear_legacy')",
        )
        _require(
            pos_enc_layer_type == "rel_pos_espnet", f"pos_enc_layer_type {pos_enc_layer_type!r}"
        )
        _require(
            selfattention_layer_type == "rel_selfattn",
            f"selfattention_layer_type {selfattention_layer_type!r}",
        )
        _require(normalize_before, "normalize_before=False")
        _require(not use_dynamic_chunk, "use_dynamic_chunk=True")
        _require(global_cmvn is None, "global_cmvn")
        _require(activation_type in ACTIVATIONS, f"activation_type {activation_type!r}")
        self._output_size = output_size
        self.input_size = input_size
        self.embed = INPUT_LAYERS[input_layer](
            input_size, output_size, 0.0, EspnetRelPositionalEncoding(output_size)
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        self.static_chunk_size = static_chunk_size
        self.positions = ProjectedPositions()  # for forward_chunk; not a parameter or buffer
        self.graphs: CapturedGraphs | None = None  # decoding steps as traced graphs
        self.step_threads: int | None = None  # torch threads of a captured step

    def output_size(self) -> int:
        return self._output_size

    def forward(
        self,
        xs: torch.Tensor,
        xs_lens: torch.Tensor,
        decoding_chunk_size: int = 0,
        num_decoding_left_chunks: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch xs [B, T, input_size] -> (out [B, T, D], pad mask [B, 1, T]).

        As in the official static-chunk setup, ``decoding_chunk_size`` and
        ``num_decoding_left_chunks`` have no effect: attention is limited by
        ``static_chunk_size`` (1 = causal, 0 = full context) and padding.
        """
        pad_mask, att_mask = encoder_attention_mask(xs_lens, xs.size(1), self.static_chunk_size)
        xs, pos_emb = self.embed(xs)
        for index, layer in enumerate(self.encoders):
            check(f"encoder layer {index}")
            xs = layer(xs, att_mask, pos_emb)
        return self.after_norm(xs), pad_mask

    def new_cache(self) -> KVCache:
        """An empty cache for one sequence (every layer's keys and values)."""
        return KVCache(len(self.encoders))

    def capture_graphs(self, threads: int | None = None) -> None:
        """Run ``forward_chunk``'s decoding steps of up to ``CAPTURED_STEP_ROWS`` rows (one
        new position each) as traced graphs from now on (graph_capture.py), one per row count,
        on ``threads`` torch threads (None: the caller's): a load-time choice for CPUs, as
        ``Qwen2Model.capture_graphs``. A CosyVoice-300M step is ~1,000 small operations
        around 98 products; eager, each paid Python and the interpreter lock. The same floats
        (benchmarks/README.md for the time saved)."""
        self.graphs = CapturedGraphs(self)
        self.step_threads = threads

    @torch.inference_mode()
    def warm_graphs(self) -> None:
        """Trace the step graphs now (``graph_capture.trace_step_graphs``)."""
        if self.graphs is not None:
            inputs = self.after_norm.weight.new_zeros(CAPTURED_STEP_ROWS, 1, self.input_size)
            trace_step_graphs(self.forward_chunk, self.new_cache, inputs)

    def forward_chunk(
        self, xs: torch.Tensor, cache: KVCache | list[KVCache] | None = None
    ) -> tuple[torch.Tensor, KVCache | list[KVCache]]:
        """Causally encode the next positions xs [B, T1, input_size] after those in the caches.

        Equivalent to the official ``forward_chunk(xs, offset=cache.length,
        required_cache_size=-1, att_mask=tril)`` as the v1 LLM calls it: each new position sees
        every cached position and the new positions up to itself. Each layer projects only the
        new positions. One cache (or None) for a batch of one; a list of B caches for B rows, each
        bringing one new position (a decoding step). Returns (out [B, T1, D], the cache(s)),
        extended in place.
        """
        single = not isinstance(cache, list)
        caches = [self.new_cache() if cache is None else cache] if single else cache
        batch, chunk = xs.shape[:2]
        if len(caches) != batch or (batch > 1 and chunk != 1):
            raise ValueError(
                f"{batch} rows of {chunk} positions need {batch} caches and one "
                f"position per row when batched; got {len(caches)} caches"
            )
        distances = CachedDistances.of(caches, chunk, xs.device)
        longest = distances.keep.size(-1)
        positions = self.positions.covering(self, longest, xs)
        # every layer's keys and values with room for the new positions, filled by the layers
        attention = self.encoders[0].self_attn
        like = xs.new_empty(
            attention.h, chunk, attention.d_k, dtype=attention.attention_dtype or xs.dtype
        )
        slots = [[c.reserve(index, like) for c in caches] for index in range(len(self.encoders))]
        for c in caches:
            c.advance(chunk)
        captured = chunk == 1 and batch <= CAPTURED_STEP_ROWS and self.graphs is not None
        if captured and not torch.jit.is_tracing():
            out = self._captured_step(xs, slots, [p[:, :longest] for p in positions], distances)
        else:
            out = self._layers(xs, slots, positions, distances)
        return out, (caches[0] if single else caches)

    def _layers(
        self,
        xs: torch.Tensor,
        slots: StepSlots,
        positions: Sequence[torch.Tensor],
        distances: CachedDistances,
    ) -> torch.Tensor:
        xs = self.embed.out(xs) * self.embed.pos_enc.xscale
        for layer, layer_slots, layer_positions in zip(
            self.encoders, slots, positions, strict=True
        ):
            xs = layer.forward_cached(xs, layer_slots, layer_positions, distances)
        return self.after_norm(xs)

    def _captured_step(
        self,
        xs: torch.Tensor,
        slots: StepSlots,
        positions: list[torch.Tensor],
        distances: CachedDistances,
    ) -> torch.Tensor:
        """``_layers`` of a decoding step through the graph of its row count: the rows' cached
        keys and values, the positional rows and the distances are inputs (their lengths vary;
        the graph writes the new position in place), so one graph serves every step of that
        many rows."""
        rows, layers = xs.size(0), len(slots)

        def traced(xs, keep, clamped, *rest):  # noqa: ANN001, ANN202 - graph inputs
            positions, slots = rest[:layers], nested_slots(rest[layers:], layers, rows)
            return self._layers(xs, slots, positions, CachedDistances(keep, clamped))

        key = ("step", rows, xs.dtype, xs.device)
        args = (xs, *distances, *positions, *flat_slots(slots))
        return self.graphs.run(key, traced, args, self.step_threads)


class ConformerEncoder(_Encoder):
    """Official ConformerEncoder restricted to the yaml options (no macaron, no conv module)."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = True,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            input_size, output_size, input_layer, pos_enc_layer_type, normalize_before,
            static_chunk_size, use_dynamic_chunk, global_cmvn, selfattention_layer_type,
            activation_type,
        )  # fmt: skip
        _require(not macaron_style, "macaron_style=True")
        _require(not use_cnn_module, "use_cnn_module=True")
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(
                output_size,
                RelPositionMultiHeadedAttention(attention_heads, output_size, key_bias=key_bias),
                PositionwiseFeedForward(
                    output_size, linear_units, 0.0, ACTIVATIONS[activation_type]()
                ),
            )
            for _ in range(num_blocks)
        )


class TransformerEncoder(_Encoder):
    """Official TransformerEncoder restricted to the yaml options."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "abs_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        key_bias: bool = True,
        selfattention_layer_type: str = "selfattn",
        activation_type: str = "relu",
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            input_size, output_size, input_layer, pos_enc_layer_type, normalize_before,
            static_chunk_size, use_dynamic_chunk, global_cmvn, selfattention_layer_type,
            activation_type,
        )  # fmt: skip
        self.encoders = nn.ModuleList(
            TransformerEncoderLayer(
                output_size,
                RelPositionMultiHeadedAttention(attention_heads, output_size, key_bias=key_bias),
                PositionwiseFeedForward(
                    output_size, linear_units, 0.0, ACTIVATIONS[activation_type]()
                ),
            )
            for _ in range(num_blocks)
        )
