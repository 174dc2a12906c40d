"""U-Net velocity estimator of the v1/v2 flow (official `cosyvoice/flow/decoder.py`).

The official module is assembled from Matcha-TTS components (`ResnetBlock1D`, `Block1D`,
`Downsample1D`, `Upsample1D`, `TimestepEmbedding`) and a diffusers `BasicTransformerBlock`.
Only the configuration CosyVoice uses is re-implemented here (layer-norm transformer blocks,
self-attention only, GELU feed-forward), with the same module tree so that the official
`flow.pt` keys (`decoder.estimator.*`) load with `strict=True`:

    time_mlp.linear_{1,2}
    down_blocks.i.0        ResnetBlock1D: mlp.1, block1.block.{0,1}, block2.block.{0,1}, res_conv
    down_blocks.i.1.j      BasicTransformerBlock: norm1, attn1.to_{q,k,v}, attn1.to_out.0,
                           norm3, ff.net.0.proj, ff.net.2
    down_blocks.i.2        Downsample1D (.conv) or Conv1d
    mid_blocks.i.{0,1}, up_blocks.i.{0,1,2}, final_block.block.{0,1}, final_proj

The causal variant used by v2 swaps the blocks for left-padded convolutions and LayerNorm
(`block.{0,2}`) and can restrict attention to static chunks when streaming.

Dropout positions of the official tree hold `nn.Identity` placeholders: this package only
runs inference, and the placeholders keep the parameter indices (`to_out.0`, `ff.net.2`) intact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.attention import attention, sees_everything
from cosyvoice_lite.networks.flow_matching import TimeConditioning, per_row
from cosyvoice_lite.networks.graph_capture import CapturedGraphs
from cosyvoice_lite.networks.linear import grouped

# The official code turns boolean attention masks into an additive bias with this constant
# (`cosyvoice.utils.common.mask_to_bias`), not with -inf.
_MASKED_BIAS = -1.0e10

_GELU_APPROXIMATION = {"gelu": "none", "gelu-approximate": "tanh"}


# --------------------------------------------------------------------------------------------
# attention masks


def attention_bias(mask: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias (B, 1, T, T) from a frame mask (B, 1, T); None when every query
    may see every key (``attention.sees_everything``).

    `chunk_size > 0` restricts every query to its own chunk and all earlier chunks (the official
    `subsequent_chunk_mask`, whose ONNX-friendly form ignores `num_decoding_left_chunks`).
    """
    keys = mask.bool()  # (B, 1, T)
    length = keys.shape[-1]
    if sees_everything(keys, length, chunk_size):
        return None
    if chunk_size > 0:
        pos = torch.arange(length, device=mask.device)
        chunk_end = (torch.div(pos, chunk_size, rounding_mode="trunc") + 1) * chunk_size
        allowed = keys & (pos.unsqueeze(0) < chunk_end.unsqueeze(1)).unsqueeze(0)  # (B, T, T)
    else:
        allowed = keys.expand(-1, length, -1)
    # Official quirk (`add_optional_chunk_mask`): a query row that may see nothing is opened up
    # completely rather than producing NaNs; its output is masked away later anyway.
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty_rows
    bias = (1.0 - allowed.to(dtype)) * _MASKED_BIAS
    return bias.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# time embedding


class SinusoidalPosEmb(nn.Module):
    """Matcha sinusoidal embedding of the flow time t (scale 1000, sin half first)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ModelDirError(f"SinusoidalPosEmb needs an even dimension, got {dim}")
        self.dim = dim

    def forward(self, x: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        if x.ndim < 1:
            x = x.unsqueeze(0)
        half_dim = self.dim // 2
        step = math.log(10000) / (half_dim - 1)
        freqs = torch.exp(torch.arange(half_dim, device=x.device).float() * -step)
        # Same multiplication order as the official code: (scale * t) * freq.
        emb = scale * x.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (`linear_1`, `linear_2`)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu") -> None:
        super().__init__()
        if act_fn != "silu":
            raise ModelDirError(f"TimestepEmbedding supports act_fn 'silu' only, got {act_fn!r}")
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


# --------------------------------------------------------------------------------------------
# convolutional blocks


class Block1D(nn.Module):
    """Conv1d(k3) -> GroupNorm -> Mish, with the frame mask applied before and after."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1),
            nn.GroupNorm(groups, dim_out),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    """Two Block1D with the time embedding added in between, plus a 1x1 residual conv."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups=groups)
        self.block2 = Block1D(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def modulation(self, time_emb: torch.Tensor) -> torch.Tensor:
        """What the block adds to every frame [B, dim_out], from the time embedding alone."""
        return self.mlp(time_emb)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, modulation: torch.Tensor
    ) -> torch.Tensor:
        h = self.block1(x, mask)
        h = h + per_row(modulation, h.shape[0]).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    """Strided conv (k3, stride 2, pad 1) halving the time axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """Transposed conv (k4, stride 2, pad 1) doubling the time axis."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalConv1d(nn.Conv1d):
    """Conv1d left-padded with kernel_size - 1 zeros, so frame t sees only frames <= t."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=1,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        # The official module pads kernel_size - 1 regardless of dilation (dilation is always 1).
        self.causal_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0), value=0.0))


class Transpose(nn.Module):
    """``x.transpose(dim0, dim1)``; with ``contiguous`` laid out in that order in memory."""

    def __init__(self, dim0: int, dim1: int, contiguous: bool = False) -> None:
        super().__init__()
        self.dim0 = dim0
        self.dim1 = dim1
        self.contiguous = contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(self.dim0, self.dim1)
        return x.contiguous() if self.contiguous else x


class CausalBlock1D(nn.Module):
    """CausalConv1d(k3) -> LayerNorm over channels -> Mish (keys `block.0`, `block.2`)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3),
            Transpose(1, 2),
            nn.LayerNorm(dim_out),
            # back to channel-major memory: left as a transposed view (as officially), the Mish,
            # the masks, the padding and the residual adds after it all ran strided
            Transpose(1, 2, contiguous=True),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock1D(ResnetBlock1D):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__(dim, dim_out, time_emb_dim, groups)
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)


# --------------------------------------------------------------------------------------------
# transformer block (diffusers BasicTransformerBlock, layer_norm variant, self-attention only)


class Attention(nn.Module):
    """Multi-head self-attention with bias-free q/k/v projections (diffusers `Attention`)."""

    linear_groups = {"qkv": ("to_q", "to_k", "to_v")}

    def __init__(self, query_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Identity()])

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, -1).transpose(1, 2)

        q, k, v = (split_heads(y) for y in grouped(self, "qkv", hidden_states))
        out = attention(q, k, v, attention_bias)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.to_out[0](out)


class GELU(nn.Module):
    """Linear projection followed by GELU (diffusers `GELU`, key `proj`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """`net.0` = GELU(proj), `net.1` = dropout placeholder, `net.2` = output Linear."""

    def __init__(self, dim: int, mult: int = 4, activation_fn: str = "gelu") -> None:
        super().__init__()
        if activation_fn not in _GELU_APPROXIMATION:
            raise ModelDirError(
                f"unsupported estimator act_fn {activation_fn!r}; "
                f"expected one of {sorted(_GELU_APPROXIMATION)}"
            )
        inner_dim = int(dim * mult)
        self.net = nn.ModuleList(
            [
                GELU(dim, inner_dim, approximate=_GELU_APPROXIMATION[activation_fn]),
                nn.Identity(),
                nn.Linear(inner_dim, dim),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention + feed-forward (keys `norm1`, `attn1`, `norm3`, `ff`)."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        activation_fn: str = "gelu",
    ) -> None:
        super().__init__()
        del dropout  # inference only
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn=activation_fn)

    def forward(
        self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), attention_bias)
        return hidden_states + self.ff(self.norm3(hidden_states))


# --------------------------------------------------------------------------------------------
# the U-Nets


class ConditionalDecoder(nn.Module):
    """v1 U-Net estimator: predicts the flow velocity from [x, mu, spks, cond] and time t.

    Constructor keywords are those of the official yaml (`dropout` is accepted and ignored).
    """

    causal = False
    graphs: CapturedGraphs | None = None  # capture_graphs: forward as traced graphs

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "gelu",
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.static_chunk_size = 0

        resnet_cls = CausalResnetBlock1D if self.causal else ResnetBlock1D
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        time_embed_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim, act_fn="silu")

        def transformer_stack(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                [
                    BasicTransformerBlock(dim, num_heads, attention_head_dim, dropout, act_fn)
                    for _ in range(n_blocks)
                ]
            )

        def same_length_conv(dim: int) -> nn.Module:
            if self.causal:
                return CausalConv1d(dim, dim, 3)
            return nn.Conv1d(dim, dim, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        output_channel = in_channels
        for i, channel in enumerate(channels):
            input_channel, output_channel = output_channel, channel
            is_last = i == len(channels) - 1
            self.down_blocks.append(
                nn.ModuleList(
                    [
                        resnet_cls(input_channel, output_channel, time_embed_dim),
                        transformer_stack(output_channel),
                        same_length_conv(output_channel)
                        if is_last
                        else Downsample1D(output_channel),
                    ]
                )
            )

        self.mid_blocks = nn.ModuleList()
        for _ in range(num_mid_blocks):
            self.mid_blocks.append(
                nn.ModuleList(
                    [
                        resnet_cls(channels[-1], output_channel, time_embed_dim),
                        transformer_stack(output_channel),
                    ]
                )
            )

        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            input_channel = up_channels[i] * 2
            output_channel = up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            self.up_blocks.append(
                nn.ModuleList(
                    [
                        resnet_cls(input_channel, output_channel, time_embed_dim),
                        transformer_stack(output_channel),
                        same_length_conv(output_channel) if is_last else Upsample1D(output_channel),
                    ]
                )
            )

        final_channel = up_channels[-1]
        self.final_block = (
            CausalBlock1D(final_channel, final_channel)
            if self.causal
            else Block1D(final_channel, final_channel)
        )
        self.final_proj = nn.Conv1d(final_channel, out_channels, 1)

    @staticmethod
    def _transformers(
        x: torch.Tensor, bias: torch.Tensor | None, blocks: nn.ModuleList
    ) -> torch.Tensor:
        h = x.transpose(1, 2).contiguous()
        for block in blocks:
            h = block(h, bias)
        return h.transpose(1, 2).contiguous()

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
        """x, mu, cond: (B, 80, T); mask: (B, 1, T); t: (B,); spks: (B, 80) -> (B, out, T).

        `streaming` selects static-chunk attention; it only has an effect on the causal variant.
        time: `time_conditioning(t)` computed beforehand (a solver's fixed schedule), else from t.
        With `capture_graphs` set, runs as a traced graph (the same floats).
        """
        if time is None:
            time = self.time_conditioning(t)
        if self.graphs is None or spks is None or cond is None or torch.jit.is_tracing():
            return self._velocity(x, mask, mu, spks, cond, streaming, time.blocks)
        # An input every query sees whole (no padding, no chunk boundary) gets a graph of its own
        # without attention biases: a traced graph keeps the bias it was traced with, which adds
        # 0 to every score of such an input (the same floats) and costs torch's CPU kernel ~8%
        # of its attention time. The modulations' rows are in the key too: a graph keeps
        # per_row's choice between theirs and the first.
        unmasked = sees_everything(mask, x.shape[-1], self.static_chunk_size if streaming else 0)
        key = (streaming, unmasked, x.shape[0], time.blocks[0].shape[0], x.dtype, x.device)

        def traced(x, mask, mu, spks, cond, *blocks):  # noqa: ANN001, ANN202 - graph inputs
            return self._velocity(x, mask, mu, spks, cond, streaming, blocks, unmasked)

        return self.graphs.run(key, traced, (x, mask, mu, spks, cond, *time.blocks))

    def capture_graphs(self) -> None:
        """Run `forward`, and the causal U-Net's incremental stream calls (flow_v2.py), as traced
        graphs from now on (graph_capture.py): a load-time choice for CPUs, where each of the
        U-Net's ~2,000 operations a call paid Python and the interpreter lock."""
        self.graphs = CapturedGraphs(self)

    def _velocity(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor | None,
        cond: torch.Tensor | None,
        streaming: bool,
        modulations: Sequence[torch.Tensor],
        unmasked: bool = False,
    ) -> torch.Tensor:
        """``unmasked``: every query of the input sees every key (so no level needs a bias)."""
        modulations = iter(modulations)
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)
        chunk_size, dtype = self.static_chunk_size if streaming else 0, x.dtype
        # one attention bias per frame mask: a level's blocks (all the mid ones) share it
        biases: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def bias(frames: torch.Tensor) -> torch.Tensor | None:
            if unmasked:
                return None
            for known, made in biases:
                if known is frames:
                    return made
            biases.append((frames, attention_bias(frames, chunk_size, dtype)))
            return biases[-1][1]

        hiddens = []
        masks = [mask]
        for resnet, transformers, downsample in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x, mask_down, next(modulations))
            x = self._transformers(x, bias(mask_down), transformers)
            hiddens.append(x)  # skip connection
            x = downsample(x * mask_down)
            masks.append(mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]

        for resnet, transformers in self.mid_blocks:
            x = resnet(x, mask_mid, next(modulations))
            x = self._transformers(x, bias(mask_mid), transformers)

        mask_up = mask_mid
        for resnet, transformers, upsample in self.up_blocks:
            mask_up = masks.pop()
            skip = hiddens.pop()
            # The transposed conv may produce one frame more than the skip has (odd lengths).
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = resnet(x, mask_up, next(modulations))
            x = self._transformers(x, bias(mask_up), transformers)
            x = upsample(x * mask_up)
        x = self.final_block(x, mask_up)
        return self.final_proj(x * mask_up) * mask

    def time_conditioning(self, t: torch.Tensor) -> TimeConditioning:
        """Every resnet's modulation (down, mid, then up blocks) from t [B] alone."""
        # t may be float32 over lower-precision weights: its sinusoids are computed in float32
        emb = self.time_mlp(self.time_embeddings(t).to(self.time_mlp.linear_1.weight.dtype))
        return TimeConditioning(tuple(resnet.modulation(emb) for resnet in self.resnets()))

    def time_modules(self) -> list[nn.Module]:
        """The modules only `time_conditioning` reads (see `_EulerCFM.fix_time_conditioning`)."""
        return [self.time_mlp, *(resnet.mlp for resnet in self.resnets())]

    def resnets(self) -> Iterator[ResnetBlock1D]:
        """The resnet blocks in the order the forward runs them."""
        for blocks in (self.down_blocks, self.mid_blocks, self.up_blocks):
            for block in blocks:
                yield block[0]


class CausalConditionalDecoder(ConditionalDecoder):
    """v2 causal U-Net estimator: causal convs, LayerNorm blocks, optional chunked attention.

    With `streaming=True` attention is limited to static chunks of `static_chunk_size` frames
    (each frame sees its own chunk and every earlier one). `num_decoding_left_chunks` is kept
    for the yaml but, as in the official code, has no effect.
    """

    causal = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "gelu",
        static_chunk_size: int = 50,
        num_decoding_left_chunks: int = 2,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            channels,
            dropout,
            attention_head_dim,
            n_blocks,
            num_mid_blocks,
            num_heads,
            act_fn,
        )
        self.static_chunk_size = static_chunk_size
        self.num_decoding_left_chunks = num_decoding_left_chunks
