"""Incremental streaming for the CosyVoice3 flow (`CausalMaskedDiffWithDiT`, see `flow_v3.py`).

The official CosyVoice3Model streams by re-running the whole flow over every token generated so
far at each chunk (`inference(token[:offset + hop + 3], streaming=True, finalize=False)`, then
keeping the mel from `2 * offset` on), which is quadratic in the utterance length. With
streaming=True every stage of the v3 flow is chunk-causal, so a stream can compute only the new
frames against caches of what came before:

    input_embedding       per token
    PreLookaheadLayer     token i reads tokens i..i+3 (conv1: real look-ahead tokens, or zeros at
                          the end) and conv1 outputs i-2..i (conv2, left padded)
    repeat_interleave x2  mel frames 2i and 2i+1 come from token i
    DiT input_embed       `proj` per frame; CausalConvPositionEmbedding: two left-padded grouped
                          convs, each frame reads the 30 frames before it
    DiT blocks            AdaLayerNormZero / feed-forward per frame (t is the same for every
                          frame); attention with the static chunk mask (a frame of chunk c
                          attends to every frame before (c + 1) * static_chunk_size) and RoPE by
                          absolute position
    CFM                   noise `rand_noise[:, :, frame]` by absolute frame; each Euler step
                          updates a frame from its own velocity; CFG = a batch of two rows

So the mel of chunk c depends only on the tokens up to the end of chunk c plus 3 look-ahead
tokens, and a frame's trajectory never depends on later frames. Per stream the state keeps, for
each of the 10 Euler steps and each CFG row (one `_StepCache`, so that the rows can be computed
apart): the last 30 inputs of both position convs and the keys/values of every DiT block; plus the
last 2 conv1 outputs of the pre-look-ahead layer. Each call then costs the new frames only (their
attention still reads all cached keys), until the stream passes its `cache_budget` (then it re-solves the frames after the frozen caches).

The mel equals the official streaming re-run chunk by chunk up to float rounding. Only whole
chunks are computed before `finalize` (the official hop schedule is chunk-aligned, so this never
delays a chunk); the final call computes the rest with zero look-ahead and the chunk mask
(= `inference(all tokens, streaming=True, finalize=True)`; the official final call uses full
attention instead, so only that last chunk can differ from what the official stream emits).

Memory: keys and values cost `10 steps x depth x 2 (k, v) x 2 (CFG rows) x heads x dim_head`
values per mel frame, prompt frames included: 3.6 MB per frame in float32 at full size (dim 1024,
depth 22), i.e. 180 MB per second of audio (50 frames/s). `cache_dtype=torch.bfloat16` or
`torch.float16` halves that; under autocast the keys already come out of the projections in the
autocast dtype and are stored as they are (no extra error).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.attention import attention
from cosyvoice_lite.networks.cache import BEFORE_PARTS, AttentionHistory, joined
from cosyvoice_lite.networks.dit import DiT, apply_rotary_pos_emb
from cosyvoice_lite.networks.flow_matching import (
    CFG_ROWS,
    OFFICIAL_STEPS,
    StreamSolve,
    TimeConditioning,
    TokenChunks,
    keeps_history,
    stack_rows,
    step_streams,
    stream_estimator,
)
from cosyvoice_lite.networks.linear import grouped

if TYPE_CHECKING:
    from cosyvoice_lite.networks.flow_v3 import CausalMaskedDiffWithDiT

__all__ = [
    "FlowV3StreamState",
    "new_stream",
    "stream_step",
    "stream_steps",
    "stream_tokens_needed",
    "kv_cache_bytes_per_frame",
]


class _StepCache:
    """What one Euler step of the DiT keeps: position-conv tails and per-block keys/values."""

    def __init__(self, depth: int, dtype: torch.dtype | None, granule: int) -> None:
        self.conv1_tail: torch.Tensor | None = None  # [1, dim, kernel - 1] inputs of conv1
        self.conv2_tail: torch.Tensor | None = None  # [1, dim, kernel - 1] inputs of conv2
        self.kv = [AttentionHistory(dtype, granule) for _ in range(depth)]
        self.frozen = False  # past the stream's budget: read, never extended

    def freeze(self) -> None:
        self.frozen = True
        for cache in self.kv:
            cache.freeze()

    def nbytes(self, shared: bool = False) -> int:
        tails = sum(
            t.numel() * t.element_size()
            for t in (self.conv1_tail, self.conv2_tail)
            if t is not None
        )
        return tails + sum(cache.nbytes(shared) for cache in self.kv)

    def fork(self) -> _StepCache:
        fork = copy.copy(self)  # the tails are replaced, never written in place: shared
        fork.kv = [cache.fork() for cache in self.kv]
        return fork


@dataclass
class FlowV3StreamState:
    """Everything one v3 flow stream remembers between chunks. Owned by one request.

    Create it with `CausalMaskedDiffWithDiT.new_stream`, feed tokens with `stream_step`.
    """

    embedding: torch.Tensor  # projected speaker embedding [1, 80]
    prompt_feat: torch.Tensor  # [1, mel_len1, 80], the cond of the first mel_len1 frames
    pending: torch.Tensor  # [1, k] token ids received but not computed yet (prompt ones first)
    cache_dtype: torch.dtype | None = None  # None: keys/values kept in the dtype they come in
    tokens_done: int = 0  # tokens turned into mel so far, prompt included
    finished: bool = False
    pre_lookahead_tail: torch.Tensor | None = None  # [1, channels, 2] last conv1 outputs
    # per Euler step, one per CFG row (the rows can be computed on different threads)
    steps: list[list[_StepCache]] = field(default_factory=list)
    last_step_frames: int = 0  # mel frames the estimator ran on in the last call (cost probe)
    # Memory budget of the DiT caches (bytes of this stream's own frames; None: unbounded). Past
    # it the caches stop growing: each call re-solves the frames from `frozen_at` on against
    # them, as the official re-runs its whole history (see solve_within_budget).
    cache_budget: int | None = None
    frozen_at: int | None = None  # first mel frame no longer cached
    frozen_mu: torch.Tensor | None = None  # [1, 80, n] mu of the frames from frozen_at on

    def cache_bytes(self, shared: bool = False) -> int:
        """Bytes held by this stream's caches (allocated capacity, keys/values included; with
        ``shared``: and by its shared prefix)."""
        tail = self.pre_lookahead_tail
        total = 0 if tail is None else tail.numel() * tail.element_size()
        return total + sum(row.nbytes(shared) for step in self.steps for row in step)

    def fork(self) -> FlowV3StreamState:
        """A stream that goes on from here independently; the keys and values so far are shared
        with it, not copied (a voice's prompt, computed once: see `PromptFlowCache`)."""
        if self.finished:
            raise ValueError("a finalized flow stream cannot be forked")
        return dataclasses.replace(
            self, steps=[[row.fork() for row in step] for step in self.steps]
        )


def kv_cache_bytes_per_frame(
    estimator: DiT, dtype: torch.dtype = torch.float32, steps: int = OFFICIAL_STEPS
) -> int:
    """Key/value bytes one mel frame adds to a stream (every Euler step and block, both CFG rows)."""
    inner = estimator.transformer_blocks[0].attn.inner_dim if estimator.depth > 0 else 0
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return steps * estimator.depth * 2 * CFG_ROWS * inner * itemsize


# ------------------------------------------------------------------------------------- public


def check_streamable(flow: CausalMaskedDiffWithDiT) -> None:
    """Raise ModelDirError unless this flow can be streamed incrementally."""
    decoder = flow.decoder
    estimator = None if decoder is None else stream_estimator(decoder)
    if flow.pre_lookahead_layer is None or decoder is None or not isinstance(estimator, DiT):
        raise ModelDirError(
            "incremental streaming needs the pre-look-ahead layer and a DiT estimator"
        )
    if not hasattr(decoder, "rand_noise"):
        raise ModelDirError("incremental streaming needs the fixed-noise CausalConditionalCFM")
    chunk = estimator.static_chunk_size
    if chunk <= 0 or chunk % flow.token_mel_ratio != 0:
        raise ModelDirError(
            f"incremental streaming needs a DiT chunk ({chunk} frames) that is a whole number of "
            f"tokens ({flow.token_mel_ratio} frames each)"
        )


def new_stream(
    flow: CausalMaskedDiffWithDiT,
    prompt_token: torch.Tensor,
    prompt_feat: torch.Tensor,
    embedding: torch.Tensor,
    cache_dtype: torch.dtype | None = None,
) -> FlowV3StreamState:
    """Start a stream: prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192].

    cache_dtype: dtype of the cached keys/values (None: as computed, e.g. float32, or the
    autocast dtype under autocast). bfloat16/float16 halve the cache of a float32 run at the
    cost of rounding the history's keys and values.
    """
    check_streamable(flow)
    if prompt_token.dim() != 2 or prompt_token.shape[0] != 1:
        raise ValueError(f"prompt tokens must be [1, P], got {tuple(prompt_token.shape)}")
    if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or embedding.shape[0] != 1:
        raise ValueError("a flow stream takes one utterance (batch 1)")
    with torch.inference_mode():
        embedding = embedding.to(flow.input_embedding.weight.dtype)  # the weights' dtype
        spks = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))
    return FlowV3StreamState(
        embedding=spks,
        prompt_feat=prompt_feat.to(spks.dtype),
        pending=prompt_token,
        cache_dtype=cache_dtype,
    )


def stream_step(
    flow: CausalMaskedDiffWithDiT,
    state: FlowV3StreamState,
    token: torch.Tensor,
    finalize: bool = False,
) -> torch.Tensor:
    """Feed new speech tokens [1, k] (k >= 0); returns the mel [1, 80, m] now complete.

    Without finalize, the last `pre_lookahead_len` tokens received are look-ahead only and tokens
    are turned into mel in whole DiT chunks (`static_chunk_size / token_mel_ratio` tokens, counted
    from the prompt's first token); the rest waits for the next call. With finalize the remaining
    tokens are computed with zero look-ahead and the stream ends.
    """
    return stream_steps(flow, [state], [token], [finalize])[0]


@torch.inference_mode()
def stream_steps(
    flow: CausalMaskedDiffWithDiT,
    states: Sequence[FlowV3StreamState],
    tokens: Sequence[torch.Tensor],
    finalize: Sequence[bool],
) -> list[torch.Tensor]:
    """`stream_step` for several streams at once, each at its own position: the DiT solves of the
    streams with as many new frames run as one batch (stream i's CFG rows are rows 2i, 2i + 1).
    A stream's mel equals its `stream_step` alone up to float rounding. Every call is checked
    before any stream changes: a ValueError leaves all of them as they were."""
    return step_streams(
        flow.decoder,
        states,
        tokens,
        finalize,
        _chunks(flow),
        partial(_mu_increment, flow),
        partial(_stream_solve, flow),
        partial(_velocity, stream_estimator(flow.decoder)),
    )


# ------------------------------------------------------------------------------------ helpers


def stream_tokens_needed(
    flow: CausalMaskedDiffWithDiT, state: FlowV3StreamState, new_tokens: int
) -> int:
    """How many more tokens, after `new_tokens` more, the stream needs before `stream_step` (not
    final) computes mel: 0 when those would already complete a chunk."""
    return _chunks(flow).needed(state, new_tokens)


def _chunks(flow: CausalMaskedDiffWithDiT) -> TokenChunks:
    """Whole DiT chunks (in tokens), counted from the prompt's first token."""
    ratio = flow.token_mel_ratio
    return TokenChunks(
        stream_estimator(flow.decoder).static_chunk_size // ratio, flow.pre_lookahead_len, ratio
    )


def _mu_increment(
    flow: CausalMaskedDiffWithDiT,
    state: FlowV3StreamState,
    token: torch.Tensor,
    context: torch.Tensor | None,
) -> torch.Tensor:
    """mu [1, 80, ratio * n] of n new tokens: embedding, pre-look-ahead layer, repeat."""
    pre = flow.pre_lookahead_layer
    xs = flow.input_embedding(torch.clamp(token, min=0)).to(state.embedding.dtype)
    h = xs.transpose(1, 2)
    if context is not None:
        ctx = flow.input_embedding(torch.clamp(context, min=0)).to(xs.dtype)
        h = torch.cat([h, ctx.transpose(1, 2)], dim=2)
    # conv1 sees the next pre_lookahead_len tokens: the real ones, or zeros at the end
    h = F.pad(h, (0, pre.pre_lookahead_len - (h.shape[2] - xs.shape[1])))
    h = F.leaky_relu(pre.conv1(h))
    # conv2 (left padded) sees the last conv1 outputs of the previous chunk, zeros at the start
    left = pre.conv2.kernel_size[0] - 1
    tail = state.pre_lookahead_tail
    h = torch.cat([tail if tail is not None else h.new_zeros(1, h.shape[1], left), h], dim=2)
    state.pre_lookahead_tail = h[:, :, h.shape[2] - left :].clone()
    h = pre.conv2(h).transpose(1, 2) + xs
    return h.repeat_interleave(flow.token_mel_ratio, dim=1).transpose(1, 2)


def _stream_solve(
    flow: CausalMaskedDiffWithDiT, state: FlowV3StreamState, mu: torch.Tensor, start: int
) -> StreamSolve:
    """The DiT's share of a stream's call: new frames mu [1, 80, n] at mel frame `start`."""
    estimator: DiT = stream_estimator(flow.decoder)
    while len(state.steps) < flow.decoder.steps:
        state.steps.append(
            [
                _StepCache(estimator.depth, state.cache_dtype, estimator.static_chunk_size)
                for _ in range(CFG_ROWS)
            ]
        )
    return StreamSolve(state, mu, start, state.steps, state.cache_bytes())


CAPTURED_ROWS = 2  # the most rows of one traced increment graph (a stream's CFG pair)


def _velocity(
    estimator: DiT,
    x: torch.Tensor,
    mu: torch.Tensor,
    t: torch.Tensor,
    spks: torch.Tensor,
    cond: torch.Tensor,
    caches: list[_StepCache],
    starts: list[int],
    time: TimeConditioning | None = None,
) -> torch.Tensor:
    """DiT.forward(streaming=True, all-ones mask) on new frames [R, 80, n] of R rows (CFG rows
    of streams), row r at its stream's frame `starts[r]`, against its own step cache
    `caches[r]`. time: t's conditioning as the official batch of two CFG rows (the solver's
    table), computed here when not given. With the estimator's graphs captured
    (graph_capture.py), rows in pairs run as traced graphs: their caches are read before the
    graph and written after it (`_IncrementCall` around `_increment`)."""
    # every row has the same t: conditioned as the official batch of two CFG rows (a batch of
    # another size could round differently); the modulations take its first row (per_row)
    if time is None:
        time = estimator.time_conditioning(t.expand(CFG_ROWS))
    graphs = estimator.graphs
    if graphs is None or torch.jit.is_tracing() or not keeps_history(caches):
        call = _IncrementCall(estimator, caches, starts, x)
        return call.store(_increment(estimator, call.layout, *call.inputs(x, mu, spks, cond, time)))

    # captured: rows in pairs, as the U-Net's (flow_v2._estimator_increment): two graphs serve
    # every batch
    def begin(mine: slice) -> tuple[_IncrementCall, tuple[torch.Tensor, ...]]:
        call = _IncrementCall(estimator, caches[mine], starts[mine], x[mine])
        return call, call.inputs(x[mine], mu[mine], spks[mine], cond[mine], time)

    increment = partial(_increment, estimator)
    return stack_rows(graphs.run_in_groups(x, CAPTURED_ROWS, begin, increment))


@dataclass(frozen=True)
class _Layout:
    """What the tensors of one increment call are (the key of its traced graph): its rows, and
    per DiT block and row the dtype the cache stores new keys in where that rounds what a reader
    gets back (None: read as computed); ``keeps``: whether the call returns its new conv tails,
    keys and values (see `flow_v2._Layout`)."""

    rows: int
    stored: tuple[tuple[torch.dtype | None, ...], ...]
    keeps: bool = True


HEAD_INPUTS = 7  # x, mu, spks, cond, the rotary angles and the two position convs' left frames


def _increment(estimator: DiT, layout: _Layout, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The DiT's velocity for new frames of R rows as a function of tensors alone, so that it can
    run as a traced graph. ``inputs`` (``_IncrementCall.inputs``): x, mu [R, 80, n], spks
    [R, 80], cond [R, 80, n], each row's rotary angles [R, n, rot], both position convs' left
    frames [R, dim, k], the time modulations (one per block, then the final one), the keys before
    the new ones per block and row (``BEFORE_PARTS`` each: `AttentionHistory.before`), then the
    values likewise, and each row's additive chunk mask [n, keys]. Returns the velocity [R, 80, n], both convs' new left
    frames, each block's new keys, then its new values (the velocity alone unless
    ``layout.keeps``)."""
    x, mu, spks, cond, rope, *tails = inputs[:HEAD_INPUTS]
    depth = estimator.depth
    modulations = inputs[HEAD_INPUTS : HEAD_INPUTS + depth]
    final = inputs[HEAD_INPUTS + depth]
    at = HEAD_INPUTS + depth + 1
    per_block = layout.rows * BEFORE_PARTS
    keys_before = inputs[at : at + depth * per_block]
    values_before = inputs[at + depth * per_block : at + 2 * depth * per_block]
    masks = inputs[at + 2 * depth * per_block :]
    x, mu, cond = x.transpose(1, 2), mu.transpose(1, 2), cond.transpose(1, 2)
    h = estimator.input_embed.proj(torch.cat(_input_parts(estimator, x, cond, mu, spks), dim=-1))
    # h first, so the sum keeps h's contiguous layout (see dit.InputEmbedding)
    positions, new_tails = _conv_position_increment(estimator.input_embed.conv_pos_embed, h, tails)
    h = h + positions
    new_keys, new_values = [], []
    residual = h
    for depth_index, (block, modulation) in enumerate(
        zip(estimator.transformer_blocks, modulations, strict=True)
    ):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.attn_norm(h, modulation)
        block_parts = slice(depth_index * per_block, (depth_index + 1) * per_block)
        before = (keys_before[block_parts], values_before[block_parts])
        stored = layout.stored[depth_index]
        out, keys, values = _attention_increment(block.attn, norm, rope, before, stored, masks)
        if layout.keeps:
            new_keys.append(keys)
            new_values.append(values)
        h = h + gate_msa.unsqueeze(1) * out
        ff_in = block.ff_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp.unsqueeze(1) * block.ff(ff_in)
    if estimator.long_skip_connection is not None:
        h = estimator.long_skip_connection(torch.cat((h, residual), dim=-1))
    h = estimator.norm_out(h, final)
    velocity = estimator.proj_out(h).transpose(1, 2)
    if not layout.keeps:
        return (velocity,)
    return (velocity, *new_tails, *new_keys, *new_values)


def _input_parts(
    estimator: DiT, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor
) -> list[torch.Tensor]:
    """The official InputEmbedding order: [x, cond, mu, spk]."""
    parts = [x, cond, mu]
    if estimator.input_embed.spk_dim > 0:
        parts.append(spks.unsqueeze(1).expand(-1, x.shape[1], -1))
    return parts


def _conv_position_increment(
    pos: nn.Module, h: torch.Tensor, tails: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CausalConvPositionEmbedding on new frames h [R, n, dim]: each conv reads the last
    `kernel_size - 1` inputs of the row's previous call (``tails``, one per conv; zeros at the
    start, as the left padding). Returns its output and each conv's new left frames."""
    left = pos.kernel_size - 1
    x = h.transpose(1, 2)
    new_tails = []
    for conv, tail in zip((pos.conv1, pos.conv2), tails, strict=True):
        x = torch.cat([tail, x], dim=2)
        new_tails.append(x[:, :, -left:].clone())  # not a view of the input (left > 0)
        # grouped: one kernel path for any number of rows, so a row's floats do not depend on
        # the rows beside it (measured at full size; unlike the U-Net's float32 convolutions,
        # flow_matching.conv1d_by_row; test_row_parallel checks v3 streams in shares)
        x = conv(x)
    return x.transpose(1, 2), new_tails


def _attention_increment(
    attn: nn.Module,
    x: torch.Tensor,
    rope: torch.Tensor,
    before: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    stored: Sequence[torch.dtype | None],
    masks: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DiT Attention for new frames x [R, n, dim]: projections for all rows, attention per
    row over its keys and values before the new ones (``before``: ``BEFORE_PARTS`` per row, as
    stored) and the new ones (read back through the dtype they are stored in, ``stored``), with
    its chunk mask. Returns the output and the new keys and values [R, heads, n, head_dim].

    As officially, RoPE rotates the un-split projections (head 0 only). The official output
    masking uses the last query row of the mask, which sees every frame: nothing is zeroed.
    """
    total, n = x.shape[0], x.shape[1]
    query, key, value = grouped(attn, "qkv", x)
    query, key = apply_rotary_pos_emb(query, rope), apply_rotary_pos_emb(key, rope)
    head_dim = key.shape[-1] // attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], n, attn.heads, head_dim).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    outs = []
    for row in range(total):
        mine, parts = slice(row, row + 1), slice(row * BEFORE_PARTS, (row + 1) * BEFORE_PARTS)
        keys = joined(before[0][parts], key[mine], stored[row])
        values = joined(before[1][parts], value[mine], stored[row])
        outs.append(attention(query[mine], keys, values, masks[row]))
    out = stack_rows(outs).transpose(1, 2).reshape(total, n, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out.to(x.dtype))), key, value


class _IncrementCall:
    """One increment call of R rows: its inputs gathered from the rows' step caches, and its
    outputs stored into them (``store``), around `_increment`."""

    def __init__(
        self, estimator: DiT, caches: list[_StepCache], starts: list[int], x: torch.Tensor
    ) -> None:
        self.caches = caches
        n, chunk = x.size(2), estimator.static_chunk_size
        rotary = estimator.rotary_embed
        self.rope = stack_rows([rotary.forward_from_seq_len(n, offset=s) for s in starts])
        pos = estimator.input_embed.conv_pos_embed
        zeros = x.new_zeros(1, estimator.dim, pos.kernel_size - 1)
        self.tails = [
            stack_rows([zeros if getattr(c, name) is None else getattr(c, name) for c in caches])
            for name in ("conv1_tail", "conv2_tail")
        ]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        stored = []
        for depth, block in enumerate(estimator.transformer_blocks):
            attn = block.attn
            empty = x.new_zeros(1, attn.heads, 0, attn.inner_dim // attn.heads)
            for cache in caches:
                keys, values = cache.kv[depth].before(empty)
                self.keys += keys
                self.values += values
            stored.append(tuple(cache.kv[depth].rounds_to(x.dtype) for cache in caches))
        # masked: -inf, as torch's attention turns the official's boolean mask into
        self.masks = [
            cache.kv[0].chunk_bias(start, n, chunk, x, -torch.inf)
            for cache, start in zip(caches, starts, strict=True)
        ]
        self.layout = _Layout(len(caches), tuple(stored), keeps=keeps_history(caches))

    def inputs(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        time: TimeConditioning,
    ) -> tuple[torch.Tensor, ...]:
        """`_increment`'s inputs."""
        head = (x, mu, spks, cond, self.rope, *self.tails, *time.blocks, time.final)
        return (*head, *self.keys, *self.values, *self.masks)

    def store(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Keep the call's new conv tails, keys and values in the rows' caches (not where a
        cache is frozen); returns the velocity."""
        if not self.layout.keeps:
            return outputs[0]
        depth = len(self.caches[0].kv)
        tails = outputs[1:3]
        keys, values = outputs[3 : 3 + depth], outputs[3 + depth :]
        for row, cache in enumerate(self.caches):
            mine = slice(row, row + 1)
            if not cache.frozen:
                cache.conv1_tail, cache.conv2_tail = (tail[mine] for tail in tails)
            for history, new_keys, new_values in zip(cache.kv, keys, values, strict=True):
                history.append(new_keys[mine], new_values[mine])
        return outputs[0]
