"""1-D convolutions over channels-last activations, chosen at load by the layout of the weights.

Why: on a CPU, oneDNN computes a 1-D convolution fastest with the channels innermost. torch's
``conv1d`` over the default [B, C, T] layout reorders the input and the output of every call, and
for a vocoder's long signals the reorders cost as much as the products (a [1, 128, 22017]
bfloat16 output took 9 ms to reorder, its dilated k=11 convolution 10 ms). A convolution whose
weight is stored channels-last (``to_channels_last``, ``precision.channels_last_convolutions`` at
load) runs here as a 2-D convolution over [B, C, 1, T] views and returns channels-last
activations, which elementwise operations keep, so a stack of them reorders nothing between
layers. Same values: bfloat16 gave the same floats on an AMX CPU, float32 differs by oneDNN's
summation order (up to 3.5e-7 of a waveform); weights in the default layout take torch's
``conv1d`` as before (export, ``exact_float32``), and so do unbatched [C, T] inputs. Measured
(2 threads, Intel Xeon with AMX, 4 s of audio; benchmarks/README.md, ``bench_conv_layout.py``):
the vocoders 1.48-1.84x faster in bfloat16, 1.10-1.25x in float32.

The helpers below (padding, joining, upsampling along time) keep the layout of their input, so
the layers between convolutions do not turn channels-last activations back (a constant pad of a
3-D tensor returns the default layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def to_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """The same [O, I, K] weight stored with the input channels innermost (strides (I*K, 1, I))."""
    return weight.transpose(1, 2).contiguous().transpose(1, 2)


def is_channels_last(weight: torch.Tensor) -> bool:
    """Whether a 3-D weight is stored channels-last (``to_channels_last``), which selects the
    2-D kernel. A weight of one input channel or one tap is the same memory in either layout and
    counts as not (torch's ``conv1d`` as loaded)."""
    return weight.dim() == 3 and weight.size(1) > 1 and weight.size(2) > 1 and weight.stride(1) == 1


def conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv1d`` with zero padding; channels-last activations out when ``weight`` is
    channels-last and ``x`` a batch [B, C, T]."""
    if not is_channels_last(weight) or x.dim() != 3:
        return F.conv1d(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(
        x.unsqueeze(2),
        weight.unsqueeze(2),
        bias,
        (1, stride),
        (0, padding),
        (1, dilation),
        groups,
    ).squeeze(2)


def pad_time(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Zeros before and after the frames of [B, C, T] (or [C, T]), in the layout of ``x``."""
    return F.pad(x.unsqueeze(-2), (left, right)).squeeze(-2)


def reflect_pad_time(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``nn.ReflectionPad1d((left, right))`` of [B, C, T] (or [C, T]), in the layout of ``x``."""
    return F.pad(x.unsqueeze(-2), (left, right, 0, 0), mode="reflect").squeeze(-2)


def cat_time(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, C, T_i] (or [C, T_i]) joined along time, in the layout of the parts."""
    return torch.cat([part.unsqueeze(-2) for part in parts], dim=-1).squeeze(-2)


def repeat_frames(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of [B, C, T] by an integer ``factor`` (every frame ``factor`` times), as
    ``F.interpolate(mode="nearest")``, in the layout of ``x`` ([C, T]: torch's own way)."""
    if x.dim() != 3:
        return F.interpolate(x.unsqueeze(0), scale_factor=float(factor), mode="nearest")[0]
    repeated = F.interpolate(x.unsqueeze(2), scale_factor=(1.0, float(factor)), mode="nearest")
    return repeated.squeeze(2)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters, zero padding) that takes the 2-D kernel when its weight was
    stored channels-last at load."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        # "same"/"valid" padding and non-zero padding modes: torch's own path (none here uses them)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv1d(
            input, weight, bias, self.stride[0], self.padding[0], self.dilation[0], self.groups
        )


class ConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` that takes the 2-D kernel when its weight was stored channels-last
    at load."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if not is_channels_last(self.weight) or input.dim() != 3:
            return super().forward(input, output_size)
        extra = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 1, self.dilation
        )
        return F.conv_transpose2d(
            input.unsqueeze(2),
            self.weight.unsqueeze(2),
            self.bias,
            (1, self.stride[0]),
            (0, self.padding[0]),
            (0, extra[0]),
            self.groups,
            (1, self.dilation[0]),
        ).squeeze(2)
