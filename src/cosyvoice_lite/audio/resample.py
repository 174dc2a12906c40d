"""Band-limited (windowed-sinc) resampling, equal to ``torchaudio.transforms.Resample`` with its
defaults (``sinc_interp_hann``, ``lowpass_filter_width=6``, ``rolloff=0.99``).

The official frontend resamples every prompt with that transform, so prompt features only match
the official ones if the resampler is reproduced sample for sample. Like the transform (and unlike
``torchaudio.functional.resample``), the kernel is computed in float64 on the CPU and then rounded
to float32.

The polyphase kernel has one row per output phase of the *reduced* rate ratio, so its size grows
with that ratio: 48 kHz -> 16 kHz needs 1 row, but 16001 Hz -> 16000 Hz would need 16000 rows of
16015 taps (1 GB). Kernels are therefore built only up to :data:`MAX_KERNEL_ELEMENTS` (every pair
of the standard rates 16/22.05/24/32/44.1/48 kHz fits, so those stay bit-identical to torchaudio);
any other ratio is computed directly, output block by output block, with the same windowed-sinc
weights evaluated in float64 for just the taps inside the window. Memory then stays a few MB per
block and time grows with the output length times the window width, whatever the rates.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from cosyvoice_lite.errors import AudioError

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
MAX_KERNEL_ELEMENTS = 1 << 20
"""Largest polyphase kernel built (4 MB in float32); the biggest standard pair needs 291,200."""
BLOCK_ELEMENTS = 1 << 18
"""Weights computed at once by the direct path (2 MB in float64 per temporary)."""


def reduced_rates(orig_freq: int, new_freq: int) -> tuple[int, int]:
    for name, freq in (("orig_freq", orig_freq), ("new_freq", new_freq)):
        if int(freq) != freq or freq <= 0:
            raise AudioError(f"resampling needs positive integer sample rates, got {name}={freq!r}")
    gcd = math.gcd(int(orig_freq), int(new_freq))
    return int(orig_freq) // gcd, int(new_freq) // gcd


def _width(orig: int, new: int) -> tuple[float, int]:
    # Cut a little below the lower Nyquist frequency; this also tames edge effects when upsampling.
    base_freq = min(orig, new) * ROLLOFF
    return base_freq, math.ceil(LOWPASS_FILTER_WIDTH * orig / base_freq)


def kernel_elements(orig_freq: int, new_freq: int) -> int:
    """Size of the polyphase kernel ``orig_freq -> new_freq`` would need."""
    orig, new = reduced_rates(orig_freq, new_freq)
    return new * (2 * _width(orig, new)[1] + orig)


def _sinc_hann_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase kernel ``[new, 1, 2 * width + orig]`` for the reduced rates ``orig -> new``."""
    lowpass_filter_width = LOWPASS_FILTER_WIDTH
    base_freq, width = _width(orig, new)

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


@lru_cache(maxsize=16)
def resample_kernel(
    orig_freq: int,
    new_freq: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, int]:
    """Cached ``(kernel, width)`` for ``orig_freq -> new_freq`` on ``device`` in ``dtype``.

    The kernel is always computed on the CPU (float64, rounded to float32) and then moved, so it is
    the same on every device. Callers must not modify the returned tensor. Ratios whose kernel
    would exceed :data:`MAX_KERNEL_ELEMENTS` raise AudioError (``resample`` takes the direct path).
    """
    orig, new = reduced_rates(orig_freq, new_freq)
    if kernel_elements(orig, new) > MAX_KERNEL_ELEMENTS:
        raise AudioError(
            f"no polyphase kernel for {orig_freq} Hz -> {new_freq} Hz: the reduced "
            f"ratio {orig}/{new} is too large"
        )
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
    if kernel_elements(orig, new) > MAX_KERNEL_ELEMENTS:
        return resample_direct(waveform, orig_freq, new_freq)
    kernel, width = resample_kernel(int(orig_freq), int(new_freq), waveform.dtype, waveform.device)

    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    length = flat.shape[-1]
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded[:, None], kernel, stride=orig)  # [batch, new, frames]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[..., : output_length(orig, new, length)]
    return out.reshape(shape[:-1] + out.shape[-1:])


def resample_direct(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """The same windowed-sinc resampling computed per output sample, in blocks: memory bounded by
    :data:`BLOCK_ELEMENTS` for any ratio. Output sample ``j`` is the sum over inputs ``i`` of
    ``x[i] * h(i / orig - j / new)``, which is what each row of the polyphase kernel holds; the
    weights here are float64 (equal to the kernel's up to float32 rounding)."""
    if not waveform.is_floating_point():
        raise AudioError(f"resampling needs a floating point waveform, got {waveform.dtype}")
    orig, new = reduced_rates(orig_freq, new_freq)
    base_freq, width = _width(orig, new)
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1]).to(torch.float64)
    rows, length = flat.shape
    total = output_length(orig, new, length)
    # zero padding on both sides stands for the inputs outside the signal
    padded = F.pad(flat, (width + 1, width + 2))
    taps = torch.arange(2 * width + 2)
    block = max(1, BLOCK_ELEMENTS // ((2 * width + 2) * max(rows, 1)))
    out = torch.empty(rows, total, dtype=torch.float64)
    lpw = LOWPASS_FILTER_WIDTH
    for start in range(0, total, block):
        j = torch.arange(start, min(start + block, total))
        first = torch.div(j * orig, new, rounding_mode="floor") - width  # first input in the window
        idx = first[:, None] + taps[None, :]  # [B, T] input positions
        # exact integer numerator: (i / orig - j / new) = (i * new - j * orig) / (orig * new)
        t = (idx * new - j[:, None] * orig).to(torch.float64) / (orig * new) * base_freq
        t = t.clamp(-lpw, lpw)
        window = torch.cos(t * math.pi / lpw / 2) ** 2
        t = t * math.pi
        h = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base_freq / orig)
        x = padded[:, idx + width + 1]  # [rows, B, T]; idx >= -width - 1 always
        out[:, start : start + len(j)] = (x * h).sum(-1)
    return out.to(waveform.dtype).reshape(shape[:-1] + (total,))
