"""CosyVoice3 flow: speech tokens -> mel (official `CausalMaskedDiffWithDiT`, `cosyvoice/flow/flow.py`).

tokens -> `input_embedding` (80-d) -> `PreLookaheadLayer` -> repeat x token_mel_ratio -> mu,
then the conditional flow matching decoder (a `CausalConditionalCFM` around the DiT estimator)
turns (mu, speaker, prompt mel) into the mel. No Conformer encoder in v3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.networks import flow_v3_stream
from cosyvoice_lite.networks.flow_v3_stream import FlowV3StreamState
from cosyvoice_lite.networks.utterances import UtteranceFlow

__all__ = ["PreLookaheadLayer", "CausalMaskedDiffWithDiT"]


class PreLookaheadLayer(nn.Module):
    """Official `cosyvoice/transformer/upsample_encoder.py:PreLookaheadLayer`.

    conv1 (kernel pre_lookahead_len + 1) sees `pre_lookahead_len` future frames: zeros at the end
    of an utterance, or real look-ahead frames (`context`) while streaming. Then LeakyReLU(0.01),
    a causal conv2 (kernel 3, left pad 2) and a residual connection.
    """

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: [B, T, C]; context: [B, <= pre_lookahead_len, C] frames that follow `inputs`."""
        outputs = inputs.transpose(1, 2)
        if context is not None and context.shape[1] > 0:
            if context.shape[1] > self.pre_lookahead_len:
                raise ValueError(
                    f"look-ahead context has {context.shape[1]} frames, "
                    f"at most {self.pre_lookahead_len} are used"
                )
            outputs = torch.cat([outputs, context.transpose(1, 2)], dim=2)
            missing = self.pre_lookahead_len - context.shape[1]
        else:
            missing = self.pre_lookahead_len
        outputs = F.pad(outputs, (0, missing))
        outputs = F.leaky_relu(self.conv1(outputs))
        outputs = F.pad(outputs, (self.conv2.kernel_size[0] - 1, 0))
        outputs = self.conv2(outputs).transpose(1, 2)
        return outputs + inputs


class CausalMaskedDiffWithDiT(UtteranceFlow, nn.Module):
    """The v3 flow. Constructor keywords are the official ones; training-only ones are ignored.

    `decoder` is a built `CausalConditionalCFM` (see `flow_matching.py`) holding the DiT estimator.
    """

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        pre_lookahead_layer: nn.Module | None = None,
        decoder: nn.Module | None = None,
        decoder_conf: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.vocab_size = vocab_size
        self.output_type = output_type
        self.input_frame_rate = input_frame_rate
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.pre_lookahead_len = pre_lookahead_len
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder
        self.token_mel_ratio = token_mel_ratio

    def _mel_rate_mu(
        self, token: torch.Tensor, token_len: torch.Tensor, finalize: bool, streaming: bool
    ) -> torch.Tensor:
        """The look-ahead layer, each token repeated token_mel_ratio times (UtteranceFlow).
        Padded token embeddings are zero, which is what the look-ahead of a row's last tokens
        sees alone."""
        del token_len, streaming  # the layer has no mask and no attention
        if self.pre_lookahead_layer is None or self.decoder is None:
            raise ValueError("CausalMaskedDiffWithDiT was built without its sub-modules")
        if finalize:
            h = self.pre_lookahead_layer(token)
        else:
            look = self.pre_lookahead_len
            h = self.pre_lookahead_layer(token[:, :-look], context=token[:, -look:])
        return h.repeat_interleave(self.token_mel_ratio, dim=1)

    # ---------------------------------------------------------------------------------------
    # incremental streaming (flow_v3_stream.py)

    def new_stream(
        self,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        cache_dtype: torch.dtype | None = None,
    ) -> FlowV3StreamState:
        """Start a stream: prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192]."""
        return flow_v3_stream.new_stream(self, prompt_token, prompt_feat, embedding, cache_dtype)

    def stream_step(
        self, state: FlowV3StreamState, token: torch.Tensor, finalize: bool = False
    ) -> torch.Tensor:
        """Feed new tokens [1, k]; returns the mel [1, 80, m] now complete (see flow_v3_stream)."""
        return self.stream_steps([state], [token], [finalize])[0]

    def stream_tokens_needed(self, state: FlowV3StreamState, new_tokens: int) -> int:
        """Tokens still needed, after `new_tokens` more, before a chunk is computed."""
        return flow_v3_stream.stream_tokens_needed(self, state, new_tokens)

    def stream_steps(
        self,
        states: Sequence[FlowV3StreamState],
        tokens: Sequence[torch.Tensor],
        finalize: Sequence[bool],
    ) -> list[torch.Tensor]:
        """`stream_step` for several streams, their DiT solves batched (see flow_v3_stream)."""
        return flow_v3_stream.stream_steps(self, states, tokens, finalize)
