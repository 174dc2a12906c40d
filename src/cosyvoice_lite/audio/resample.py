"""Band-limited (windowed-sinc) resampling, equal to ``torchaudio.transforms.Resample`` with its
defaults (``sinc_interp_hann``, ``lowpass_filter_width=6``, ``rolloff=0.99``).

The official frontend resamples every prompt with that transform, so prompt features only match
the official ones if the resampler is reproduced sample for sample. Like the transform (and unlike
``torchaudio.functional.resample``), the kernel is computed in float64 on the CPU and then rounded
to float32.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from cosyvoice_lite.errors import AudioError

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


def reduced_rates(orig_freq: int, new_freq: int) -> tuple[int, int]:
    for name, freq in (("orig_freq", orig_freq), ("new_freq", new_freq)):
        if int(freq) != freq or freq <= 0:
            raise AudioError(f"resampling needs positive integer sample rates, got {name}={freq!r}")
    gcd = math.gcd(int(orig_freq), int(new_freq))
    return int(orig_freq) // gcd, int(new_freq) // gcd


def _sinc_hann_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase kernel ``[new, 1, 2 * width + orig]`` for the reduced rates ``orig -> new``."""
    lowpass_filter_width = LOWPASS_FILTER_WIDTH
    # Cut a little below the lower Nyquist frequency; this also tames edge effects when upsampling.
    base_freq = min(orig, new) * ROLLOFF
    width = math.ceil(lowpass_filter_width * orig / base_freq)

    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # torchaudio builds the output-phase offsets in the default dtype (float32) before adding the
    # float64 input positions; keeping that rounding makes the kernel bit-identical.
    phase = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new
    t = (phase + idx) * base_freq
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)

    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    scale = base_freq / orig
    kernel = torch.where(t == 0, torch.tensor(1.0, dtype=torch.float64), t.sin() / t)
    kernel = kernel * (window * scale)
    return kernel.to(torch.float32), width


@lru_cache(maxsize=64)
def resample_kernel(
    orig_freq: int,
    new_freq: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, int]:
    """Cached ``(kernel, width)`` for ``orig_freq -> new_freq`` on ``device`` in ``dtype``.

    The kernel is always computed on the CPU (float64, rounded to float32) and then moved, so it is
    the same on every device. Callers must not modify the returned tensor.
    """
    orig, new = reduced_rates(orig_freq, new_freq)
    kernel, width = _sinc_hann_kernel(orig, new)
    return kernel.to(device=device or torch.device("cpu"), dtype=dtype), width


def output_length(orig: int, new: int, length: int) -> int:
    # torchaudio takes ceil() of a float32 tensor; doing it in float32 keeps the exact same length.
    return math.ceil(float(torch.tensor(new * length / orig, dtype=torch.float32)))


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Resample ``waveform`` (``[..., time]``, floating point) from ``orig_freq`` to ``new_freq``.

    Returns the input unchanged when the rates are equal, as the official transform does.
    """
    if not waveform.is_floating_point():
        raise AudioError(f"resampling needs a floating point waveform, got {waveform.dtype}")
    orig, new = reduced_rates(orig_freq, new_freq)
    if orig == new:
        return waveform
    kernel, width = resample_kernel(int(orig_freq), int(new_freq), waveform.dtype, waveform.device)

    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    length = flat.shape[-1]
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded[:, None], kernel, stride=orig)  # [batch, new, frames]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[..., : output_length(orig, new, length)]
    return out.reshape(shape[:-1] + out.shape[-1:])
