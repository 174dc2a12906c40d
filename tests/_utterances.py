"""Whole utterances of different lengths through a v2/v3 flow in one padded batch, against each
utterance alone (``UtteranceFlow.inference``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TOL = 1e-4


def utterances_of(g: dict[str, np.ndarray]) -> list[tuple[torch.Tensor, ...]]:
    """Five utterances from a golden's (token, prompt_token, prompt_feat, embedding): the full
    prompt, a shorter one, none, and two whose prompt mel is a frame shorter / longer than
    token_mel_ratio x its tokens (as a voice-conversion prompt may be); new tokens of several
    lengths; each its own speaker."""
    token, p_tok, p_feat, emb = (
        torch.from_numpy(g[k]) for k in ("token", "prompt_token", "prompt_feat", "embedding")
    )
    return [
        (token, p_tok, p_feat, emb),
        (token.flip(1)[:, :9], p_tok[:, :4], p_feat[:, :8].flip(1), -emb),
        (token[:, 3:], p_tok[:, :0], p_feat[:, :0], emb.roll(5, 1)),
        (token[:, 2:12], p_tok[:, :5], p_feat[:, :9], emb * 0.5),
        (token[:, :7], p_tok[:, :3], p_feat[:, 1:8], emb.flip(1)),
    ]


def _padded(rows: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [1, n, ...] zero-padded along dim 1 into one batch, and their lengths."""
    size = max(r.shape[1] for r in rows)
    pad = [F.pad(r, (0, 0) * (r.dim() - 2) + (0, size - r.shape[1])) for r in rows]
    return torch.cat(pad), torch.tensor([r.shape[1] for r in rows])


def check_batched_equals_alone(flow: torch.nn.Module, utterances: list, streaming: bool) -> None:
    """Every row of one padded batch equals its utterance alone within TOL; zeros after it."""
    alone = []
    for tok, p_tok, p_feat, emb in utterances:
        mel, _ = flow.inference(
            tok, torch.tensor([tok.shape[1]]), p_tok, torch.tensor([p_tok.shape[1]]), p_feat,
            torch.tensor([p_feat.shape[1]]), emb, streaming=streaming, finalize=True,
        )  # fmt: skip
        alone.append(mel)
    tokens, p_toks, p_feats, embs = zip(*utterances, strict=True)
    mel, _ = flow.inference(
        *_padded(tokens), *_padded(p_toks), *_padded(p_feats), torch.cat(embs),
        streaming=streaming, finalize=True,
    )  # fmt: skip
    assert mel.shape == (len(utterances), 80, max(a.shape[2] for a in alone))
    for row, single in enumerate(alone):
        frames = single.shape[2]
        torch.testing.assert_close(mel[row : row + 1, :, :frames], single, atol=TOL, rtol=0)
        assert not mel[row, :, frames:].any()
