"""Whole utterances through the v2 and v3 flows (the official ``inference``), several at once.

Both flows turn [prompt tokens, new tokens] into a mel-rate ``mu`` (v2: the upsampling Conformer
encoder; v3: the look-ahead layer and repetition), then solve the CFM with the prompt's mel as
``cond`` and keep the frames after the prompt. ``UtteranceFlow.inference`` does that for B
utterances padded to one length: each row is its prompt then its new tokens, the frames past a
row's length are masked, and every row starts from the same fixed noise frames, so a row gives
what the utterance gives alone (up to float rounding). A batch of one is the official call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def join_rows(
    prompt: torch.Tensor, prompt_len: torch.Tensor, new: torch.Tensor, new_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of [B, P] ``prompt`` (its first prompt_len[i]) followed by row i of [B, N] ``new``
    (its first new_len[i]), zero-padded to the longest: ([B, L], lengths [B]). Unpadded rows
    (the official batch of one) are simply concatenated."""
    lengths = (prompt_len + new_len).to(new.device)
    if prompt.shape[0] == 1:
        return torch.cat([prompt, new], dim=1), lengths
    joined = new.new_zeros(new.shape[0], int(lengths.max()))
    for row, (p, n) in enumerate(zip(prompt_len.tolist(), new_len.tolist(), strict=True)):
        joined[row, :p] = prompt[row, :p]
        joined[row, p : p + n] = new[row, :n]
    return joined, lengths


def new_frames(ratio: int, prompt_tokens: int, tokens: int, prompt_frames: int) -> int:
    """The mel frames a whole utterance gives after its prompt: its token features (``ratio`` x
    prompt and new tokens) minus the prompt's mel frames (the frontend aligns those to ``ratio``
    x the prompt tokens, but a voice-conversion prompt may be a frame off)."""
    return ratio * (prompt_tokens + tokens) - prompt_frames


def frame_mask(lengths: list[int], frames: int, like: torch.Tensor) -> torch.Tensor:
    """[B, 1, frames] mask (1 = a frame of the row) in the dtype and device of ``like``."""
    positions = torch.arange(frames, device=like.device)
    lengths_t = torch.tensor(lengths, device=like.device)
    return (positions.unsqueeze(0) < lengths_t.unsqueeze(1)).unsqueeze(1).to(like.dtype)


class UtteranceFlow:
    """The whole-utterance ``inference`` of the v2 and v3 flows (a mixin of those nn.Modules);
    a flow supplies ``_mel_rate_mu``: the token embeddings -> mu at the mel rate."""

    input_embedding: nn.Embedding
    spk_embed_affine_layer: nn.Linear
    decoder: nn.Module
    output_size: int
    token_mel_ratio: int
    pre_lookahead_len: int

    def _mel_rate_mu(
        self, token: torch.Tensor, token_len: torch.Tensor, finalize: bool, streaming: bool
    ) -> torch.Tensor:
        """Token embeddings [B, L, D] (zero past each row's length) -> mu [B, frames, 80]."""
        raise NotImplementedError

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
        streaming: bool,
        finalize: bool,
    ) -> tuple[torch.Tensor, None]:
        """Float32 mel [B, 80, M] of the tokens after each row's prompt.

        token [B, N] (row i: its first token_len[i]), prompt_token [B, P] (its first
        prompt_token_len[i]), prompt_feat [B, T, 80] (its first prompt_feat_len[i] frames; the
        frontend aligns them to token_mel_ratio x the prompt tokens), embedding [B, spk_dim]
        (x-vector). Row i's mel is its first ``new_frames(token_mel_ratio, prompt_token_len[i],
        token_len[i], prompt_feat_len[i])`` frames, zeros after.
        With finalize=False (one utterance only) the last ``pre_lookahead_len`` tokens are only
        look-ahead context and produce no mel. streaming=True uses the chunk attention masks.
        As in the official call, a batch of one takes its prompt length from prompt_feat's shape.
        """
        batch = token.shape[0]
        if not finalize and batch != 1:
            raise ValueError(f"look-ahead calls (finalize=False) take one utterance, got {batch}")
        if not finalize and token.shape[1] <= self.pre_lookahead_len:
            raise ValueError(
                f"a non-final chunk needs more than {self.pre_lookahead_len} tokens "
                f"(the last {self.pre_lookahead_len} are look-ahead), got {token.shape[1]}"
            )

        # float inputs take the dtype the weights are stored in
        embedding = F.normalize(embedding.to(self.input_embedding.weight.dtype), dim=1)
        embedding = self.spk_embed_affine_layer(embedding)

        # prompt tokens then new tokens; padding (if any) is zeroed after the embedding
        token, token_len = join_rows(prompt_token, prompt_token_len, token, token_len)
        positions = torch.arange(token.shape[1], device=token.device)
        mask = (positions.unsqueeze(0) < token_len.unsqueeze(1)).unsqueeze(-1).to(embedding)
        token = self.input_embedding(torch.clamp(token, min=0)) * mask
        mu = self._mel_rate_mu(token, token_len, finalize, streaming)

        frames = mu.shape[1]
        if batch == 1:
            prompt_frames, lengths = [prompt_feat.shape[1]], [frames]
        else:
            prompt_frames = prompt_feat_len.tolist()
            lengths = (token_len * self.token_mel_ratio).tolist()
        new = [n - p for n, p in zip(lengths, prompt_frames, strict=True)]
        if min(new) <= 0:
            raise ValueError(
                f"prompt mel ({max(prompt_frames)} frames) is not shorter than the token features "
                f"({frames} frames); the prompt must be aligned to {self.token_mel_ratio}x tokens"
            )

        conds = torch.zeros(batch, frames, self.output_size, device=mu.device, dtype=mu.dtype)
        for row, p in enumerate(prompt_frames):
            conds[row, :p] = prompt_feat[row, :p].to(mu.dtype)
        feat, _ = self.decoder(
            mu=mu.transpose(1, 2).contiguous(),
            mask=frame_mask(lengths, frames, mu),
            spks=embedding,
            cond=conds.transpose(1, 2),
            n_timesteps=self.decoder.steps,
            streaming=streaming,
        )
        if batch == 1:
            return feat[:, :, prompt_frames[0] :].float(), None
        out = feat.new_zeros(batch, feat.shape[1], max(new), dtype=torch.float32)
        for row, (p, n) in enumerate(zip(prompt_frames, lengths, strict=True)):
            out[row, :, : n - p] = feat[row, :, p:n]
        return out, None
