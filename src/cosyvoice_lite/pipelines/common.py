"""Pieces shared by the version pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelInputs:
    """Everything the networks need for one text segment (the official ``model_input`` dict).

    Token tensors are int32 [1, T]; embeddings [1, 192] or [0, 192] when absent; the prompt mel is
    [1, T_mel, 80]. ``text`` may be an iterator of token tensors for streaming text input.
    """

    text: object
    prompt_text: torch.Tensor
    llm_prompt_speech_token: torch.Tensor
    llm_embedding: torch.Tensor
    flow_prompt_speech_token: torch.Tensor
    prompt_speech_feat: torch.Tensor
    flow_embedding: torch.Tensor
    source_speech_token: torch.Tensor | None = None


def fade_in_out(fade_in: torch.Tensor, fade_out: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the start of ``fade_in`` with the end of ``fade_out`` using a symmetric window.

    The official multiplies float32 audio by a float64 numpy window; computing the blend in float64
    and casting back reproduces its rounding exactly.
    """
    n = window.shape[0] // 2
    out = fade_in.clone()
    blended = (fade_in[..., :n].double() * window[:n].to(fade_in.device)
               + fade_out[..., -n:].double() * window[n:].to(fade_in.device))
    out[..., :n] = blended.to(out.dtype)
    return out
