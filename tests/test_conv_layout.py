"""Convolutions over channels-last activations (networks/conv_layout.py): the values of torch's
default kernels, channels-last activations out, and helpers that keep the layout between layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cosyvoice_lite.device import cpu_features
from cosyvoice_lite.networks.conv_layout import (
    Conv1d,
    ConvTranspose1d,
    cat_time,
    conv1d,
    is_channels_last,
    pad_time,
    reflect_pad_time,
    repeat_frames,
    to_channels_last,
)

# float32: oneDNN's 2-D kernel sums in another order than torch's conv1d. bfloat16: the same
# floats on an AMX CPU (measured); elsewhere its kernels for the two layouts may round a value
# one step apart (a bfloat16 step of the largest output)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.0 if cpu_features().amx else 2**-7}


def _close(x: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = 1.0 if ref.dtype == torch.float32 else float(ref.abs().max())
    return float((x.float() - ref.float()).abs().max()) <= TOLERANCE[ref.dtype] * scale


def _channels_last_activations(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.size(1) > 1


def _signal(channels: int, frames: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, channels, frames, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"), [(3, 1, 1, 1), (11, 1, 15, 3), (16, 8, 4, 1)]
)
def test_conv1d_with_a_channels_last_weight_gives_torchs_values(
    dtype: torch.dtype, kernel: int, stride: int, padding: int, dilation: int
) -> None:
    conv = Conv1d(24, 16, kernel, stride, padding, dilation).to(dtype)
    x = _signal(24, 300, dtype)
    with torch.inference_mode():
        default = conv(x)
        assert not is_channels_last(conv.weight) and torch.equal(
            default, F.conv1d(x, conv.weight, conv.bias, stride, padding, dilation)
        )
        conv.weight.data = to_channels_last(conv.weight.data)
        assert is_channels_last(conv.weight)
        fast = conv(x)
        from_channels_last = conv(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert _channels_last_activations(fast) and torch.equal(from_channels_last, fast)
    assert _close(fast, default)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_conv_with_a_channels_last_weight_gives_torchs_values(
    dtype: torch.dtype,
) -> None:
    conv = ConvTranspose1d(32, 16, 16, 8, padding=4).to(dtype)
    x = _signal(32, 40, dtype)
    with torch.inference_mode():
        default = conv(x)
        conv.weight.data = to_channels_last(conv.weight.data)
        fast = conv(x)
        sized = conv(x, output_size=[2, 16, 327])
    assert _channels_last_activations(fast) and fast.shape == default.shape == (2, 16, 320)
    assert _close(fast, default)
    assert sized.shape == (2, 16, 327)


def test_unbatched_inputs_take_torchs_kernel() -> None:
    """torch's convolutions also take one unbatched [C, T] signal; with a channels-last weight
    it goes through torch's own kernel, with the same result as the default layout's."""
    conv, transposed = Conv1d(8, 6, 5, padding=2), ConvTranspose1d(8, 6, 4, 2, padding=1)
    x = torch.randn(8, 30)
    with torch.inference_mode():
        expected = conv(x), transposed(x)
        for layer in (conv, transposed):
            layer.weight.data = to_channels_last(layer.weight.data)
        got = conv(x), transposed(x)
    assert got[0].shape == (6, 30) and got[1].shape == (6, 60)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))


def test_one_tap_or_one_channel_weights_keep_torchs_kernel() -> None:
    """A weight of one tap or one input channel is the same memory in either layout."""
    assert not is_channels_last(to_channels_last(torch.randn(8, 4, 1)))
    assert not is_channels_last(to_channels_last(torch.randn(8, 1, 5)))
    x = torch.randn(1, 4, 50)
    weight = to_channels_last(torch.randn(8, 4, 1))
    assert torch.equal(conv1d(x, weight, None), F.conv1d(x, weight))


def test_time_helpers_keep_the_values_and_the_layout() -> None:
    x = _signal(6, 20, torch.float32)
    fast = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels-last, the same values
    for helper, reference in (
        (lambda t: pad_time(t, 3, 2), lambda t: F.pad(t, (3, 2))),
        (lambda t: reflect_pad_time(t, 1, 0), lambda t: F.pad(t, (1, 0), mode="reflect")),
        (lambda t: cat_time([t, t[..., :4]]), lambda t: torch.cat([t, t[..., :4]], dim=-1)),
        (lambda t: repeat_frames(t, 4), lambda t: F.interpolate(t, scale_factor=4.0)),
    ):
        expected = reference(x)
        assert torch.equal(helper(x), expected) and helper(x).is_contiguous()
        out = helper(fast)
        assert torch.equal(out, expected) and _channels_last_activations(out)
        assert torch.equal(helper(x[0]), expected[0])  # one unbatched [C, T] signal


def test_a_stack_stays_channels_last_between_layers() -> None:
    """Convolutions, elementwise layers and padding in a row: nothing turns the activations back
    to the default layout, and the result is the default kernels' (bfloat16: the same floats)."""
    torch.manual_seed(0)
    convs = [Conv1d(16, 16, 7, padding=3).bfloat16() for _ in range(3)]
    x = _signal(16, 500, torch.bfloat16)

    def stack(x: torch.Tensor) -> torch.Tensor:
        x = convs[0](x)
        for conv in convs[1:]:
            x = x + conv(pad_time(F.leaky_relu(x, 0.1), 2, 0))[:, :, 2:] * 0.5
        return x

    with torch.inference_mode():
        default = stack(x)
        for conv in convs:
            conv.weight.data = to_channels_last(conv.weight.data)
        fast = stack(x)
    assert _channels_last_activations(fast) and _close(fast, default)
