"""The one cross-fade of the official streaming code (mel chunks in v1, waveform chunks in v1/v2)."""

from __future__ import annotations

import torch


def fade_in_out(
    fade_in: torch.Tensor, fade_out: torch.Tensor, window: torch.Tensor
) -> torch.Tensor:
    """Cross-fade the start of ``fade_in`` with the end of ``fade_out`` using a symmetric window.

    The official multiplies float32 audio by a float64 numpy window; computing the blend in float64
    and casting back reproduces its rounding exactly.
    """
    n = window.shape[0] // 2
    out = fade_in.clone()
    blended = fade_in[..., :n].double() * window[:n].to(fade_in.device) + fade_out[
        ..., -n:
    ].double() * window[n:].to(fade_in.device)
    out[..., :n] = blended.to(out.dtype)
    return out
