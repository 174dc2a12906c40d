"""Flow graphs: the encoder (speech tokens -> mu, cond, spks) and the velocity estimator.

The Euler loop with classifier-free guidance stays on the host (10 steps, see EXPORT.md): each
step runs the estimator graph on a batch of two rows, row 0 conditioned (mu, spks, cond) and
row 1 with them zeroed, and mixes `v = (1 + r) v0 - r v1`.

Encoder graph inputs (all versions): prompt_token [1, P] and token [1, N] int64 speech tokens
(P may be 0), prompt_feat [1, P_mel, 80] prompt mel (P_mel = 0 without prompt; v2/v3: 2 P),
embedding [1, 192] x-vector. Outputs: mu [1, 80, M], cond [1, 80, M] (the prompt mel in the first
P_mel frames, zeros after), spks [1, 80]. The generated mel is frames P_mel .. M of the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..networks.flow_v1 import MaskedDiffWithXvec
from ..networks.flow_v2 import CausalMaskedDiffWithXvec
from ..networks.flow_v3 import CausalMaskedDiffWithDiT
from . import dsp

V1_OVERLAP_TOKENS = 20  # official: the first and last 20 tokens of a long chunk resample apart


class EstimatorGraph(nn.Module):
    """estimator(x, mask, mu, t, spks, cond) -> velocity, all float: x, mu, cond [B, 80, T],
    mask [B, 1, T], t [B], spks [B, 80]. `streaming` bakes in the chunk attention mask."""

    def __init__(self, estimator: nn.Module, streaming: bool = False) -> None:
        super().__init__()
        self.estimator = estimator
        self.streaming = streaming

    def forward(self, x, mask, mu, t, spks, cond):  # noqa: ANN001, ANN201 (graph inputs)
        return self.estimator(x, mask, mu, t, spks, cond, streaming=self.streaming)


class DiTEstimatorGraph(EstimatorGraph):
    """The v3 DiT's forward with its attention mask built from standard boolean ops (the torch
    helper assigns through a boolean index, which exports to a boolean Where that onnxruntime
    lacks); the blocks are the network's own."""

    def forward(self, x, mask, mu, t, spks, cond):  # noqa: ANN001, ANN201
        dit = self.estimator
        attn_mask = _dit_mask(mask, dit.static_chunk_size if self.streaming else 0)
        return dit.velocity(x, mu, cond, spks, dit.time_conditioning(t), attn_mask)


def _dit_mask(mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """dit.dit_attention_mask: [B, 1, T, T] bool; rows that would see nothing see everything."""
    pad = mask.bool()  # [B, 1, T]
    size = pad.shape[-1]
    if chunk_size > 0:
        pos = torch.arange(size)
        chunk_end = (torch.div(pos, chunk_size, rounding_mode="trunc") + 1) * chunk_size
        attn = pad & (pos.unsqueeze(0) < chunk_end.unsqueeze(1)).unsqueeze(0)  # [B, T, T]
    else:
        attn = pad
    attn = attn | (attn.to(torch.int32).sum(dim=-1, keepdim=True) == 0)
    return attn.expand(-1, size, -1).unsqueeze(1)


def estimator_graph(estimator: nn.Module, streaming: bool = False) -> nn.Module:
    if hasattr(estimator, "transformer_blocks"):
        return DiTEstimatorGraph(estimator, streaming).eval()
    return EstimatorGraph(estimator, streaming).eval()


def _outputs(
    flow: nn.Module, h: torch.Tensor, prompt_feat: torch.Tensor, embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, cond, spks) from mel-rate features h [1, M, 80] as every flow's inference builds them."""
    spks = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))
    mu = h.transpose(1, 2)
    prompt = prompt_feat.transpose(1, 2)
    cond = torch.cat([prompt, torch.zeros_like(mu[:, :, prompt.shape[2] :])], dim=2)
    return mu, cond, spks


def _embed(flow: nn.Module, prompt_token: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return flow.input_embedding(torch.clamp(torch.cat([prompt_token, token], dim=1), min=0))


class FlowEncoderV1(nn.Module):
    """MaskedDiffWithXvec: embedding, Conformer, projection, length regulator (token rate ->
    22050/256 Hz, with the official separate resampling of a long chunk's first and last 20
    tokens), written with tensor lengths so one graph serves every length."""

    def __init__(self, flow: nn.Module, streaming: bool = False, finalize: bool = True) -> None:
        super().__init__()
        if streaming or not finalize:
            raise ValueError("the v1 flow has no chunk-streaming encoder")
        self.flow = flow
        self.frame_rate = int(flow.input_frame_rate)

    def forward(self, prompt_token, token, prompt_feat, embedding):  # noqa: ANN001, ANN201
        flow = self.flow
        x = _embed(flow, prompt_token, token)
        lengths = (torch.ones_like(x[:, :, 0]).sum(dim=1)).to(torch.int64)
        h, _ = flow.encoder(x, lengths)
        h = flow.encoder_proj(h).transpose(1, 2)  # [1, 80, P + N]
        n_prompt = dsp.length(prompt_token)
        prompt_part = dsp.linear_resample(
            h[:, :, :n_prompt], dsp.length(prompt_feat.transpose(1, 2))
        )
        new_part = self._resample_new(h[:, :, n_prompt:], dsp.length(token))
        h = flow.length_regulator.model(torch.cat([prompt_part, new_part], dim=2))
        return _outputs(flow, h.transpose(1, 2), prompt_feat, embedding)

    def _resample_new(self, x: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """InterpolateRegulator.inference's resampling of the new tokens, as one gather."""
        # mel_len2 = int(n / 50 * 22050 / 256) in float64, as the official Python expression
        n_mel = torch.floor(n_tokens.double() / self.frame_rate * 22050 / 256).to(torch.int64)
        ov = V1_OVERLAP_TOKENS
        edge = int(ov / self.frame_rate * 22050 / 256)
        split = n_tokens > 2 * ov
        j = torch.arange(n_mel, dtype=torch.int64)
        head, tail = j < edge, j >= n_mel - edge
        zero = torch.zeros_like(j)
        # per output frame: first input token, input tokens, first output frame, output frames
        in_start = torch.where(
            split & tail, zero + n_tokens - ov, torch.where(split & ~head, zero + ov, zero)
        )
        in_len = torch.where(
            split, torch.where(head | tail, zero + ov, zero + n_tokens - 2 * ov), zero + n_tokens
        )
        out_start = torch.where(
            split & tail, zero + n_mel - edge, torch.where(split & ~head, zero + edge, zero)
        )
        out_len = torch.where(
            split, torch.where(head | tail, zero + edge, zero + n_mel - 2 * edge), zero + n_mel
        )
        step = in_len.to(torch.float32) / out_len.to(torch.float32)
        left, right, weight = dsp.resample_taps(j - out_start, step, in_len)
        return dsp.blend(x, left + in_start, right + in_start, weight)


class FlowEncoderV2(nn.Module):
    """CausalMaskedDiffWithXvec: embedding, UpsampleConformerEncoder (x2 to mel rate), projection.
    `streaming` bakes in the chunk masks; `finalize=False` treats the last 3 tokens as look-ahead
    only (no mel for them), as a non-final streaming chunk."""

    def __init__(self, flow: nn.Module, streaming: bool = False, finalize: bool = True) -> None:
        super().__init__()
        self.flow, self.streaming, self.finalize = flow, streaming, finalize

    def forward(self, prompt_token, token, prompt_feat, embedding):  # noqa: ANN001, ANN201
        flow = self.flow
        x = _embed(flow, prompt_token, token)
        lengths = (torch.ones_like(x[:, :, 0]).sum(dim=1)).to(torch.int64)
        if self.finalize:
            h, _ = flow.encoder(x, lengths, streaming=self.streaming)
        else:
            look = flow.pre_lookahead_len
            h, _ = flow.encoder(
                x[:, :-look], lengths, context=x[:, -look:], streaming=self.streaming
            )
        return _outputs(flow, flow.encoder_proj(h), prompt_feat, embedding)


class FlowEncoderV3(nn.Module):
    """CausalMaskedDiffWithDiT: embedding, pre-look-ahead layer, repeat to mel rate."""

    def __init__(self, flow: nn.Module, streaming: bool = False, finalize: bool = True) -> None:
        super().__init__()
        self.flow, self.finalize = flow, finalize

    def forward(self, prompt_token, token, prompt_feat, embedding):  # noqa: ANN001, ANN201
        flow = self.flow
        x = _embed(flow, prompt_token, token)
        if self.finalize:
            h = flow.pre_lookahead_layer(x)
        else:
            look = flow.pre_lookahead_len
            h = flow.pre_lookahead_layer(x[:, :-look], context=x[:, -look:])
        ratio = int(flow.token_mel_ratio)
        h = (
            h.unsqueeze(2).expand(-1, -1, ratio, -1).reshape(1, -1, h.shape[-1])
        )  # repeat_interleave
        return _outputs(flow, h, prompt_feat, embedding)


# the encoder graph of each flow network (the official class names)
ENCODERS = {
    MaskedDiffWithXvec: FlowEncoderV1,
    CausalMaskedDiffWithXvec: FlowEncoderV2,
    CausalMaskedDiffWithDiT: FlowEncoderV3,
}


def flow_encoder_graph(
    flow: nn.Module, streaming: bool = False, finalize: bool = True
) -> nn.Module:
    encoder = ENCODERS.get(type(flow))
    if encoder is None:
        raise TypeError(f"no ONNX encoder graph for the flow {type(flow).__name__}")
    return encoder(flow, streaming, finalize).eval()
