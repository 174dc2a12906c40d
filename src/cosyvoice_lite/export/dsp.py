"""Export-friendly signal operations: STFT/iSTFT as convolutions and linear resampling by gathers.

ONNX has no complex tensors and no iSTFT, and `F.interpolate` bakes its output size into a traced
graph. These helpers compute the same values as `torch.stft` / `torch.istft` (center=True,
reflect padding, onesided) and `F.interpolate(mode="linear")` with standard ops only (Conv,
ConvTranspose, Pad, Gather, arithmetic), with every length taken from tensors at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _dft_basis(n_fft: int, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [n_fft // 2 + 1, n_fft] in float64."""
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft
    return torch.cos(angle), torch.sin(angle)


def stft_kernel(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """Conv1d weight [n_fft + 2, 1, n_fft]: windowed DFT, real rows then imaginary rows."""
    cos, sin = _dft_basis(n_fft, window)
    w = window.to(torch.float64)[None, :]
    return torch.cat([cos * w, -sin * w], dim=0).unsqueeze(1).float()


def istft_kernel(n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """ConvTranspose1d weight [n_fft + 2, 1, n_fft]: inverse real DFT of each frame times the
    synthesis window (the imaginary parts of the DC and Nyquist bins drop out, as in irfft)."""
    cos, sin = _dft_basis(n_fft, window)
    scale = torch.full((n_fft // 2 + 1, 1), 2.0, dtype=torch.float64)
    scale[0] = 1.0
    if n_fft % 2 == 0:
        scale[-1] = 1.0
    w = window.to(torch.float64)[None, :] / n_fft
    return torch.cat([scale * cos * w, -scale * sin * w], dim=0).unsqueeze(1).float()


def stft(x: torch.Tensor, kernel: torch.Tensor, hop: int) -> torch.Tensor:
    """x [B, L] -> [B, n_fft + 2, frames] (real parts then imaginary parts), as torch.stft with
    center=True and reflect padding. The windowed DFT runs in float64 (strided slices and one
    MatMul) and is rounded once: the vocoder's upsampling stack amplifies the last-bit
    differences of a float32 DFT summed in another order than torch's FFT."""
    n_fft = kernel.shape[-1]
    padded = F.pad(x.double().unsqueeze(1), (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]
    end = padded.shape[-1]
    taps = [padded[:, k : end - (n_fft - 1 - k) : hop] for k in range(n_fft)]
    frames = torch.stack(taps, dim=1)  # [B, n_fft, frames]
    return torch.matmul(kernel[:, 0, :].double(), frames).to(x.dtype)


def istft(
    real: torch.Tensor, imag: torch.Tensor, kernel: torch.Tensor, window: torch.Tensor, hop: int
) -> torch.Tensor:
    """[B, n_fft // 2 + 1, frames] real and imaginary parts -> [B, hop * (frames - 1)], as
    torch.istft with center=True: inverse DFT of each frame, overlap-add, division by the summed
    squared window, trim. Computed in float64 (MatMul and slices; runtimes rarely have float64
    transposed convolutions) and rounded once: the vocoder's magnitudes reach 100, so float32
    summation in another order than torch's FFT would move samples by several 1e-5."""
    n_fft = kernel.shape[-1]
    if n_fft % hop != 0:
        raise ValueError(f"n_fft {n_fft} must be a multiple of the hop {hop}")
    basis = kernel[:, 0, :].double().t()  # [n_fft, n_fft + 2]
    frames = torch.matmul(basis, torch.cat([real, imag], dim=1).double())  # [B, n_fft, F]
    blocks = n_fft // hop
    frames = frames.reshape(frames.shape[0], blocks, hop, -1)  # [B, block, hop, F]
    # frame f adds its block k to output block f + k: shift each block by k and sum
    signal = 0
    for k in range(blocks):
        signal = signal + F.pad(frames[:, k], (k, blocks - 1 - k))  # [B, hop, F + blocks - 1]
    signal = signal.transpose(1, 2).reshape(frames.shape[0], -1)  # [B, hop * (F + blocks - 1)]
    square = (window.double() ** 2).reshape(blocks, hop, 1)
    envelope = 0
    ones = torch.ones_like(frames[:1, 0, :1, :]).double()  # [1, 1, F]
    for k in range(blocks):
        envelope = envelope + F.pad(ones * square[k].unsqueeze(0), (k, blocks - 1 - k))
    envelope = envelope.transpose(1, 2).reshape(1, -1)
    half = n_fft // 2
    out = signal / envelope
    return out[:, half : out.shape[-1] - half].to(real.dtype)


def resample_taps(
    local: torch.Tensor, step: torch.Tensor, n_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-interpolation taps of output frames `local` (positions within their segment) with
    torch's float32 arithmetic: source index `step * (j + 0.5) - 0.5` clamped at 0 (a fused
    multiply-add in torch's compiled kernel: one float64 step and one rounding here), then
    (left index, right index, right weight)."""
    src = (step.double() * (local.to(torch.float32) + 0.5).double() - 0.5).float().clamp(min=0.0)
    left = src.floor()
    weight = src - left
    left = left.to(torch.int64)
    right = torch.minimum(left + 1, (n_in - 1).clamp(min=0))
    return left, right, weight


def blend(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """`(1 - w) * x[left] + w * x[right]` along the last axis, as torch's fused
    `fma(x_left, 1 - w, x_right * w)`."""
    far = (torch.index_select(x, -1, right) * weight).double()
    return (torch.index_select(x, -1, left).double() * (1.0 - weight).double() + far).to(x.dtype)


def linear_resample(
    x: torch.Tensor, n_out: torch.Tensor, step: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.interpolate(x, ..., mode="linear")` (align_corners=False) of x [B, C, n_in] to n_out
    (a 0-dim int64 tensor) frames. `step` is n_in / n_out (float32) when a size is asked for,
    1 / scale_factor when a scale factor is."""
    n_in = length(x)
    if step is None:
        step = n_in.to(torch.float32) / n_out.to(torch.float32)
    positions = torch.arange(n_out, dtype=torch.int64, device=x.device)
    return blend(x, *resample_taps(positions, step, n_in))


def linear_rescale(x: torch.Tensor, factor: int, down: bool) -> torch.Tensor:
    """`F.interpolate(x, scale_factor=factor or 1 / factor, mode="linear")` of x [B, C, n]."""
    n_in = length(x)
    n_out = torch.div(n_in, factor, rounding_mode="floor") if down else n_in * factor
    step = torch.tensor(factor if down else 1.0 / factor, dtype=torch.float32)
    return linear_resample(x, n_out, step)


def length(x: torch.Tensor) -> torch.Tensor:
    """The last dimension as a 0-dim int64 tensor (traced as a Shape op, not a constant)."""
    n = x.shape[-1]
    return n.to(torch.int64) if isinstance(n, torch.Tensor) else torch.tensor(n, dtype=torch.int64)
