"""Decoded audio as plain data; light (no torch at import), so that requests can name it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class Waveform:
    """Audio already decoded: mono samples (``[N]``, ``[1, N]`` or ``[N, 1]``; float of full scale
    1.0 (a peak above 4.0, int16 values cast to float unscaled, is refused), or 8/16/32-bit
    integer PCM, scaled as a file's would be) and their rate. Accepted wherever a file is (a
    prompt, a voice conversion's source) and checked alike; a server decodes an upload once,
    within its own limits, and hands this on."""

    samples: torch.Tensor | np.ndarray | Any
    sample_rate: int
