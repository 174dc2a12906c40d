"""DiT estimator of the CosyVoice3 flow (official `cosyvoice/flow/DiT/dit.py` + `modules.py`).

Plain torch, with the official module names so that `flow.pt` loads with `strict=True`:
`time_embed.time_mlp.{0,2}`, `input_embed.{proj,conv_pos_embed.conv1.0,conv2.0}`,
`rotary_embed.inv_freq`, `transformer_blocks.N.{attn_norm.linear,attn.to_q/k/v,attn.to_out.0,
ff.ff.0.0,ff.ff.2}`, `norm_out.linear`, `proj_out` (and `long_skip_connection` when enabled).

Official quirks reproduced on purpose (see the reference spec, section 9):
* the input concatenation order is `[x, cond, mu, spk]` (the U-Net uses `[x, mu, spk, cond]`);
* rotary embeddings are x_transformers' `RotaryEmbedding(dim_head)` with interleaved pairs, applied
  to q and k *before* the head split, so only the first `dim_head` channels (head 0) are rotated;
* the final adaptive norm chunks its modulation as `(scale, shift)`, the block norms as
  `(shift, scale, gate) x 2`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.networks.attention import attention, sees_everything
from cosyvoice_lite.networks.flow_matching import TimeConditioning, per_row
from cosyvoice_lite.networks.graph_capture import CapturedGraphs
from cosyvoice_lite.networks.linear import grouped

__all__ = [
    "DiT",
    "DiTBlock",
    "AdaLayerNormZero",
    "AdaLayerNormZeroFinal",
    "Attention",
    "FeedForward",
    "InputEmbedding",
    "CausalConvPositionEmbedding",
    "RotaryEmbedding",
    "TimestepEmbedding",
    "SinusPositionEmbedding",
    "apply_rotary_pos_emb",
    "dit_attention_mask",
]


# --------------------------------------------------------------------------------------- time


class SinusPositionEmbedding(nn.Module):
    """Sinusoidal embedding of the flow time, sin half first, time scaled by 1000."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, scale: float = 1000.0) -> torch.Tensor:
        half_dim = self.dim // 2
        step = math.log(10000) / (half_dim - 1)
        freqs = torch.exp(torch.arange(half_dim, device=x.device).float() * -step)
        # same multiplication order as the official code: (scale * t) * freq
        emb = scale * x.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """t [B] -> [B, dim]: sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_embed_dim: int = 256) -> None:
        super().__init__()
        self.time_embed = SinusPositionEmbedding(freq_embed_dim)
        self.time_mlp = nn.Sequential(
            nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        # sinusoids of a float32 t, then the weights' dtype (t may be float32 over bf16 weights)
        time_hidden = self.time_embed(timestep).to(self.time_mlp[0].weight.dtype)
        return self.time_mlp(time_hidden)


# -------------------------------------------------------------------------------------- input


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convolutions (left padded, so causal), each followed by Mish."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]."""
        x = x.transpose(1, 2)
        x = self.conv1(F.pad(x, (self.kernel_size - 1, 0)))
        x = self.conv2(F.pad(x, (self.kernel_size - 1, 0)))
        return x.transpose(1, 2)


class InputEmbedding(nn.Module):
    """Projects `[x, cond, mu, spk]` (this order) to the model width and adds the conv positions."""

    def __init__(
        self, mel_dim: int, text_dim: int, out_dim: int, spk_dim: int | None = None
    ) -> None:
        super().__init__()
        self.spk_dim = 0 if spk_dim is None else spk_dim
        self.proj = nn.Linear(mel_dim * 2 + text_dim + self.spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim=out_dim)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        text_embed: torch.Tensor,
        spks: torch.Tensor | None,
    ) -> torch.Tensor:
        """x, cond, text_embed: [B, T, C]; spks: [B, spk_dim]."""
        to_cat = [x, cond, text_embed]
        if self.spk_dim > 0:
            if spks is None:
                raise ValueError("this DiT was built with spk_dim > 0 and needs `spks`")
            to_cat.append(spks.unsqueeze(1).expand(-1, x.shape[1], -1))
        x = self.proj(torch.cat(to_cat, dim=-1))
        # x first: a sum takes its first operand's memory layout, and the conv's output is a
        # transposed view. The official's conv + x made the residual stream channel-first for
        # every block (each add and norm strided: a bf16 add of one row 0.75 ms instead of
        # 0.09 ms); addition commutes exactly, so the floats are the same.
        return x + self.conv_pos_embed(x)


# -------------------------------------------------------------------------------------- rotary


class RotaryEmbedding(nn.Module):
    """x_transformers 2.11.24 `RotaryEmbedding` (no xpos, no interpolation), as the DiT uses it.

    `inv_freq` is a persistent buffer there, so it is a key of the official checkpoint.
    """

    precision_exempt = {
        "inv_freq": "RoPE angles of positions in the thousands: bfloat16 would round them by radians"
    }

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward_from_seq_len(self, seq_len: int, offset: int = 0) -> torch.Tensor:
        """Frequencies [1, seq_len, dim], each one repeated for its interleaved pair (f0,f0,f1,f1..).

        `offset` starts the positions there (incremental streaming); the values equal the rows
        offset .. offset + seq_len - 1 of a full-length call bit for bit.
        """
        positions = torch.arange(offset, offset + seq_len, device=self.inv_freq.device)
        positions = positions.type_as(self.inv_freq)
        # computed in fp32 whatever the surrounding dtype (x_transformers disables autocast here)
        freqs = positions[:, None] * self.inv_freq[None, :]
        freqs = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return freqs.unsqueeze(0)


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotates the first `freqs.shape[-1]` channels of t [B, T, D]; the rest pass unchanged."""
    rot_dim, seq_len, orig_dtype = freqs.shape[-1], t.shape[-2], t.dtype
    if freqs.shape[-2] != seq_len:  # (a traced graph keeps no slice: its angles are t's own)
        freqs = freqs[:, -seq_len:, :]
    rotated, passthrough = t[..., :rot_dim], t[..., rot_dim:]
    rotated = rotated * freqs.cos() + _rotate_half_interleaved(rotated) * freqs.sin()
    return torch.cat((rotated, passthrough), dim=-1).type(orig_dtype)


# ------------------------------------------------------------------------------------- blocks


class AdaLayerNormZero(nn.Module):
    """LN(x) modulated by t; returns the attention input and the other five modulations."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, emb: torch.Tensor) -> torch.Tensor:
        """The six modulations [B, 6 * dim] from the time embedding (t alone decides them)."""
        return self.linear(self.silu(emb))

    def forward(
        self, x: torch.Tensor, modulation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = per_row(modulation, x.shape[0])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(emb, 6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(nn.Module):
    """Final modulation; NOTE the official chunk order here is (scale, shift)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, emb: torch.Tensor) -> torch.Tensor:
        """(scale, shift) [B, 2 * dim] from the time embedding."""
        return self.linear(self.silu(emb))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        emb = per_row(modulation, x.shape[0])
        scale, shift = torch.chunk(emb, 2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear, laid out as `ff.0.0`, `ff.2` like the official one."""

    # int8 (--quantize int8) runs these products W8A8: they multiply every frame and are bound
    # by arithmetic, where int8 products run ~2x bfloat16's on a CPU with VNNI (precision.py)
    int8_products = "every frame's products, bound by arithmetic"

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: float = 4,
        dropout: float = 0.0,
        approximate: str = "none",
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU(approximate=approximate))
        self.ff = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class Attention(nn.Module):
    """Self-attention with rotary positions on the un-split projections and a boolean mask."""

    linear_groups = {"qkv": ("to_q", "to_k", "to_v")}
    int8_products = "every frame's products, bound by arithmetic"  # as FeedForward's

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.inner_dim = dim_head * heads
        self.to_q = nn.Linear(dim, self.inner_dim)
        self.to_k = nn.Linear(dim, self.inner_dim)
        self.to_v = nn.Linear(dim, self.inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim), nn.Dropout(dropout)])

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, T, dim]; mask: bool [B, 1, T, T] (True = may attend); rope: [1, T, rot_dim]."""
        batch_size = x.shape[0]
        query, key, value = grouped(self, "qkv", x)
        if rope is not None:
            # before the head split, as the official code does: only head 0 gets positions
            query = apply_rotary_pos_emb(query, rope)
            key = apply_rotary_pos_emb(key, rope)

        head_dim = key.shape[-1] // self.heads
        query = query.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)

        out = attention(query, key, value, mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, self.heads * head_dim).to(query.dtype)
        out = self.to_out[1](self.to_out[0](out))

        if mask is not None:
            # the official code zeroes the frames that the mask's last query row cannot see
            out = out.masked_fill(~mask[:, 0, -1].unsqueeze(-1), 0.0)
        return out


class DiTBlock(nn.Module):
    def __init__(
        self, dim: int, heads: int, dim_head: int, ff_mult: float = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim=dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, mult=ff_mult, dropout=dropout, approximate="tanh")

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        mask: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim]; modulation: this block's `attn_norm.modulation` of the time embedding."""
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, modulation)
        x = x + gate_msa.unsqueeze(1) * self.attn(norm, mask=mask, rope=rope)
        ff_in = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(ff_in)


# ---------------------------------------------------------------------------------------- mask


def dit_attention_mask(mask: torch.Tensor, chunk_size: int) -> torch.Tensor | None:
    """Boolean attention mask [B, 1, T, T] from a padding mask [B, 1, T] (1 = valid frame); None
    when every query may see every key (``attention.sees_everything``).

    chunk_size > 0: each frame sees its own chunk and every earlier one (the official
    `add_optional_chunk_mask` with a static chunk and all left chunks); chunk_size == 0: full context.
    Query rows that would see nothing are opened fully, as the official helper does, so that
    attention never produces NaN (those frames are zeroed afterwards).
    """
    pad = mask.bool()  # [B, 1, T]
    size = pad.shape[-1]
    if sees_everything(pad, size, chunk_size):
        return None
    if chunk_size > 0:
        pos = torch.arange(size, device=pad.device)
        chunk_end = (torch.div(pos, chunk_size, rounding_mode="trunc") + 1) * chunk_size
        chunk = pos.unsqueeze(0) < chunk_end.unsqueeze(1)  # [T, T]
        attn = pad & chunk.unsqueeze(0)  # [B, T, T]
    else:
        attn = pad.clone()  # [B, 1, T], the same row for every query
    attn[attn.sum(dim=-1) == 0] = True
    return attn.expand(-1, size, -1).unsqueeze(1)


# ------------------------------------------------------------------------------------- model


class DiT(nn.Module):
    """Velocity estimator of the v3 flow: forward(x, mask, mu, t, spks, cond, streaming) -> [B, mel, T].

    Constructor keywords are the official ones (`cosyvoice3.yaml`); `dropout` only matters in
    training and `out_channels` / `num_decoding_left_chunks` are stored but unused, as officially.
    """

    graphs: CapturedGraphs | None = None  # capture_graphs: forward as traced graphs

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        ff_mult: float = 4,
        mel_dim: int = 80,
        mu_dim: int | None = None,
        long_skip_connection: bool = False,
        spk_dim: int | None = None,
        out_channels: int | None = None,
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedding(dim)
        mu_dim = mel_dim if mu_dim is None else mu_dim
        self.input_embed = InputEmbedding(mel_dim, mu_dim, dim, spk_dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.dim = dim
        self.depth = depth
        self.transformer_blocks = nn.ModuleList(
            [
                DiTBlock(dim=dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, dropout=dropout)
                for _ in range(depth)
            ]
        )
        self.long_skip_connection = (
            nn.Linear(dim * 2, dim, bias=False) if long_skip_connection else None
        )
        self.norm_out = AdaLayerNormZeroFinal(dim)
        self.proj_out = nn.Linear(dim, mel_dim)
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size
        self.num_decoding_left_chunks = num_decoding_left_chunks

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        streaming: bool = False,
        time: TimeConditioning | None = None,
    ) -> torch.Tensor:
        """x, mu, cond: [B, mel, T]; mask: [B, 1, T]; t: [B] or scalar; spks: [B, spk_dim].

        streaming=True uses the chunk mask of `static_chunk_size` frames; otherwise full context.
        time: `time_conditioning(t)` computed beforehand (a solver's fixed schedule), else from t.
        """
        if cond is None:
            raise ValueError("DiT.forward needs `cond` (zeros where there is no prompt)")
        if time is None:
            time = self.time_conditioning(t.repeat(x.shape[0]) if t.ndim == 0 else t)
        attn_mask = dit_attention_mask(mask, self.static_chunk_size if streaming else 0)
        if self.graphs is None or spks is None or torch.jit.is_tracing():
            return self.velocity(x, mu, cond, spks, time, attn_mask)
        # the rotary angles from the length here: a graph replays any length
        rope = self.rotary_embed.forward_from_seq_len(x.shape[2])
        masks = () if attn_mask is None else (attn_mask,)
        # the modulations' rows too: a graph keeps per_row's choice between theirs and the first
        key = ("whole", bool(masks), x.shape[0], time.final.shape[0], x.dtype, x.device)

        def traced(x, mu, cond, spks, rope, final, *rest):  # noqa: ANN001, ANN202 - graph inputs
            blocks, mask = rest[: self.depth], (rest[self.depth :] or (None,))[0]
            time = TimeConditioning(blocks, final)
            return self.velocity(x, mu, cond, spks, time, mask, rope)

        inputs = (x, mu, cond, spks, rope, time.final, *time.blocks, *masks)
        return self.graphs.run(key, traced, inputs)

    def capture_graphs(self) -> None:
        """Run `forward`, and the incremental stream calls (flow_v3_stream.py), as traced graphs
        from now on (graph_capture.py): a load-time choice for CPUs, where each of the DiT's
        operations paid Python and the interpreter lock."""
        self.graphs = CapturedGraphs(self)

    def time_conditioning(self, t: torch.Tensor) -> TimeConditioning:
        """Everything the DiT computes from t [B] alone (the time MLP and every adaptive norm's
        modulations: a third of its weights, read once per call whatever the frame count)."""
        emb = self.time_embed(t)
        blocks = tuple(block.attn_norm.modulation(emb) for block in self.transformer_blocks)
        return TimeConditioning(blocks, self.norm_out.modulation(emb))

    def time_modules(self) -> list[nn.Module]:
        """The modules only `time_conditioning` reads (see `_EulerCFM.fix_time_conditioning`)."""
        norms = [block.attn_norm.linear for block in self.transformer_blocks]
        return [self.time_embed, *norms, self.norm_out.linear]

    def velocity(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        cond: torch.Tensor,
        spks: torch.Tensor | None,
        time: TimeConditioning,
        attn_mask: torch.Tensor | None,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward after its time conditioning and boolean attention mask [B, 1, T, T]
        (None: full context): x, mu, cond [B, mel, T] -> [B, mel, T]; ``rope``: the rotary
        angles of the T frames (None: computed here)."""
        x, mu, cond = x.transpose(1, 2), mu.transpose(1, 2), cond.transpose(1, 2)
        x = self.input_embed(x, cond, mu, spks)
        if rope is None:
            rope = self.rotary_embed.forward_from_seq_len(x.shape[1])
        residual = x
        for block, modulation in zip(self.transformer_blocks, time.blocks, strict=True):
            x = block(x, modulation, mask=attn_mask, rope=rope)
        if self.long_skip_connection is not None:
            x = self.long_skip_connection(torch.cat((x, residual), dim=-1))
        x = self.norm_out(x, time.final)
        return self.proj_out(x).transpose(1, 2)
