"""v1 flow: speech tokens -> 80-bin mel (official `cosyvoice/flow/flow.py:MaskedDiffWithXvec`
and `cosyvoice/flow/length_regulator.py:InterpolateRegulator`).

Tokens (prompt + new) are embedded, encoded by a Conformer, projected to 80 channels and
linearly interpolated from 50 Hz tokens to 22050/256 Hz mel frames; a conditional flow matching
decoder then turns that into a mel, conditioned on the x-vector and on the prompt mel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.networks.crossfade import fade_in_out

# The official code hard-codes the v1 mel frame rate (22050 Hz, hop 256) in the flow.
_MEL_FRAMES_PER_SECOND = 22050 / 256
# Tokens interpolated separately at each end of a long chunk: the streaming overlap of
# `token_overlap_len` = 20 tokens in `cosyvoice/cli/model.py`.
_OVERLAP_TOKENS = 20


@dataclass
class FlowV1StreamState:
    """Per-request state of the v1 flow stream (the official keeps it in dicts keyed by uuid)."""

    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor
    generator: torch.Generator
    overlap: int  # mel frames cross-faded between consecutive chunks
    window: torch.Tensor
    flow_cache: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 80, 0, 2))
    mel_overlap: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 80, 0))


def mel_frames_for_tokens(n_tokens: int, input_frame_rate: int = 50) -> int:
    """Mel frames the v1 flow produces for `n_tokens` (same float expression as official)."""
    return int(n_tokens / input_frame_rate * 22050 / 256)


def non_pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True on valid frames."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(-1)


def _interpolate(x: torch.Tensor, size: int) -> torch.Tensor:
    """Linear resampling of (B, T, D) features to (B, D, size)."""
    return F.interpolate(x.transpose(1, 2).contiguous(), size=size, mode="linear")


class InterpolateRegulator(nn.Module):
    """Token-rate to mel-rate resampler followed by a small conv stack.

    `model` = [Conv1d k3, GroupNorm, Mish] x len(sampling_ratios) + Conv1d k1 (keys model.0,
    model.1, model.3, ..., model.12 for four ratios).
    """

    def __init__(
        self,
        channels: int,
        sampling_ratios: Sequence[int],
        out_channels: int | None = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.sampling_ratios = tuple(sampling_ratios)
        out_channels = out_channels or channels
        layers: list[nn.Module] = []
        for _ in self.sampling_ratios:
            layers += [
                nn.Conv1d(channels, channels, 3, 1, 1),
                nn.GroupNorm(groups, channels),
                nn.Mish(),
            ]
        layers.append(nn.Conv1d(channels, out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, ylens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch path: (B, T, D) features resampled to max(ylens) frames -> (B, T', D), ylens."""
        max_len = int(ylens.max())
        mask = non_pad_mask(ylens, max_len).to(x).unsqueeze(-1)
        out = self.model(_interpolate(x, max_len)).transpose(1, 2).contiguous()
        return out * mask, ylens

    def inference(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        mel_len1: int,
        mel_len2: int,
        input_frame_rate: int = 50,
    ) -> tuple[torch.Tensor, int]:
        """Resample prompt features x1 (1, T1, D) to mel_len1 frames and new-token features
        x2 (1, T2, D) to mel_len2 frames, run the conv stack on the concatenation.

        When T2 > 40 the first and last 20 tokens are resampled on their own (to 34 frames each)
        so that the streaming overlap regions map to a fixed mel span.
        """
        if x2.shape[1] > 2 * _OVERLAP_TOKENS:
            edge = mel_frames_for_tokens(_OVERLAP_TOKENS, input_frame_rate)
            head = _interpolate(x2[:, :_OVERLAP_TOKENS], edge)
            mid = _interpolate(x2[:, _OVERLAP_TOKENS:-_OVERLAP_TOKENS], mel_len2 - 2 * edge)
            tail = _interpolate(x2[:, -_OVERLAP_TOKENS:], edge)
            resampled = torch.cat([head, mid, tail], dim=2)
        else:
            resampled = _interpolate(x2, mel_len2)
        if x1.shape[1] != 0:
            resampled = torch.cat([_interpolate(x1, mel_len1), resampled], dim=2)
        out = self.model(resampled).transpose(1, 2).contiguous()
        return out, mel_len1 + mel_len2


class MaskedDiffWithXvec(nn.Module):
    """v1 flow module. Keys: input_embedding, spk_embed_affine_layer, encoder.*, encoder_proj,
    length_regulator.*, decoder.estimator.*.

    Constructor keywords are the official yaml ones; `output_type`, `only_mask_loss` and
    `decoder_conf` are accepted and ignored. `encoder` must provide `output_size()` and
    `forward(xs, xs_lens) -> (out, masks)`; `decoder` is a `ConditionalCFM`.
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
        encoder: nn.Module | None = None,
        length_regulator: nn.Module | None = None,
        decoder: nn.Module | None = None,
        decoder_conf: Any = None,
    ) -> None:
        super().__init__()
        if encoder is None or length_regulator is None or decoder is None:
            raise ModelDirError(
                "MaskedDiffWithXvec needs encoder, length_regulator and decoder modules"
            )
        self.input_size = input_size
        self.output_size = output_size
        self.vocab_size = vocab_size
        self.input_frame_rate = input_frame_rate
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder
        self.length_regulator = length_regulator

    # ---------------------------------------------------------------------------------------
    # streaming: the official v1 chunking (chunks of hop + 20 overlap tokens, flow cache of the
    # overlap's noise and mu, mel cross-fade), as the same new_stream / stream_step contract the
    # v2 and v3 flows have

    def new_stream(
        self,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        generator: torch.Generator,
    ) -> FlowV1StreamState:
        """Start a stream: prompt_token [1, P], prompt_feat [1, T, 80], embedding [1, 192];
        the flow noise comes from ``generator``."""
        overlap = int(_OVERLAP_TOKENS / self.input_frame_rate * _MEL_FRAMES_PER_SECOND)
        window = torch.from_numpy(np.hamming(2 * overlap))
        return FlowV1StreamState(prompt_token, prompt_feat, embedding, generator, overlap, window)

    @torch.inference_mode()
    def stream_step(
        self, state: FlowV1StreamState, token: torch.Tensor, finalize: bool = False
    ) -> torch.Tensor:
        """The mel [1, 80, m] of the next chunk of tokens [1, k] (the previous chunk's last 20
        tokens again, then new ones). Without finalize the last overlap frames are held back
        and cross-faded into the next chunk."""
        device = token.device
        mel, state.flow_cache = self.inference(
            token=token,
            token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
            prompt_token=state.prompt_token,
            prompt_token_len=torch.tensor(
                [state.prompt_token.shape[1]], dtype=torch.int32, device=device
            ),
            prompt_feat=state.prompt_feat,
            prompt_feat_len=torch.tensor(
                [state.prompt_feat.shape[1]], dtype=torch.int32, device=device
            ),
            embedding=state.embedding,
            flow_cache=state.flow_cache,
            generator=state.generator,
        )
        if state.mel_overlap.shape[2] != 0:
            mel = fade_in_out(mel, state.mel_overlap, state.window)
        if not finalize:
            state.mel_overlap = mel[:, :, -state.overlap :]
            mel = mel[:, :, : -state.overlap]
        return mel

    def stream_steps(
        self,
        states: Sequence[FlowV1StreamState],
        tokens: Sequence[torch.Tensor],
        finalize: Sequence[bool],
    ) -> list[torch.Tensor]:
        """`stream_step` for several streams, one after another: each v1 chunk re-runs the whole
        flow over its prompt and overlap with its request's own noise generator (the official
        v1 stream), so streams are not batched (yet)."""
        if not len(states) == len(tokens) == len(finalize):
            raise ValueError("stream_steps needs one token tensor and one finalize per stream")
        return [
            self.stream_step(state, token, last)
            for state, token, last in zip(states, tokens, finalize, strict=True)
        ]

    @torch.inference_mode()
    def inference(
        self,
        token: torch.Tensor,
        token_len: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_token_len: torch.Tensor,
        prompt_feat: torch.Tensor,
        prompt_feat_len: torch.Tensor,
        embedding: torch.Tensor,
        flow_cache: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate the mel of `token` (1, T2), conditioned on the prompt.

        prompt_token: (1, T1) (T1 may be 0); prompt_feat: (1, mel_len1, 80) prompt mel;
        embedding: (1, 192) x-vector; flow_cache: (1, 80, N, 2) from the previous streaming
        chunk, or None / an empty cache (N = 0). Returns (mel (1, 80, mel_len2) float32,
        new flow cache).
        """
        if token.shape[0] != 1:
            raise ValueError(
                f"flow inference runs one utterance at a time, got batch {token.shape[0]}"
            )
        if token.shape[1] == 0:
            raise ValueError("flow inference needs at least one speech token")
        if (prompt_token.shape[1] == 0) != (prompt_feat.shape[1] == 0):
            raise ValueError(
                "prompt speech tokens and prompt mel must be given together "
                f"(got {prompt_token.shape[1]} tokens and {prompt_feat.shape[1]} mel frames)"
            )

        # x-vector projection; float inputs take the dtype the weights are stored in
        dtype = self.input_embedding.weight.dtype
        embedding = self.spk_embed_affine_layer(F.normalize(embedding.to(dtype), dim=1))

        # concat prompt tokens and new tokens, embed (negative ids are clamped like official)
        token_len1, token_len2 = prompt_token.shape[1], token.shape[1]
        token = torch.cat([prompt_token, token], dim=1)
        token_len = prompt_token_len + token_len
        mask = non_pad_mask(token_len, token.shape[1]).unsqueeze(-1).to(embedding)
        token = self.input_embedding(torch.clamp(token, min=0)) * mask

        # encode and resample to mel rate
        h, _ = self.encoder(token, token_len)
        h = self.encoder_proj(h)
        mel_len1 = prompt_feat.shape[1]
        mel_len2 = mel_frames_for_tokens(token_len2, self.input_frame_rate)
        h, _ = self.length_regulator.inference(
            h[:, :token_len1], h[:, token_len1:], mel_len1, mel_len2, self.input_frame_rate
        )

        # the prompt mel conditions the first mel_len1 frames
        conds = torch.zeros(
            [1, mel_len1 + mel_len2, self.output_size], device=token.device, dtype=h.dtype
        )
        conds[:, :mel_len1] = prompt_feat.to(h.dtype)
        conds = conds.transpose(1, 2)

        mel_mask = torch.ones([1, 1, mel_len1 + mel_len2], device=h.device, dtype=h.dtype)
        feat, flow_cache = self.decoder(
            mu=h.transpose(1, 2).contiguous(),
            mask=mel_mask,
            n_timesteps=self.decoder.steps,
            spks=embedding,
            cond=conds,
            prompt_len=mel_len1,
            cache=flow_cache,
            generator=generator,
        )
        return feat[:, :, mel_len1:].float(), flow_cache
