"""Device and dtype are chosen once, at load; unavailable ones are clear errors."""

from __future__ import annotations

import pytest
import torch

from cosyvoice_lite.device import (
    Placement,
    available_devices,
    configure_backend,
    cpu_features,
    resolve_placement,
    slow_precision_warning,
)
from cosyvoice_lite.errors import DeviceError


def test_cpu_and_dtypes() -> None:
    assert resolve_placement("cpu").dtype == torch.float32
    assert resolve_placement("CPU", "bf16").dtype == torch.bfloat16
    assert resolve_placement("cpu", "float16").dtype == torch.float16
    assert "cpu" in available_devices()


def test_mps_is_refused_with_why() -> None:
    """Apple's MPS has no float64, which the vocoders compute their phase in: it failed at the
    first request (v1/v2) or at load (v3)."""
    with pytest.raises(DeviceError, match="no float64"):
        resolve_placement("mps")


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "xpu:3", "tpu", "gpu"])
def test_unavailable_device_lists_what_is_available(device: str) -> None:
    if (
        device.split(":")[0] in {d.split(":")[0] for d in available_devices()}
        and device != "cuda:7"
    ):
        pytest.skip(f"{device} exists on this machine")
    with pytest.raises(DeviceError, match="available here: cpu"):
        resolve_placement(device)


def test_a_numbered_cpu_is_refused_not_taken_for_all_of_them() -> None:
    assert resolve_placement("cpu:0").device == torch.device("cpu")
    with pytest.raises(DeviceError, match="the CPU is 'cpu'"):
        resolve_placement("cpu:1")


def test_unknown_dtype() -> None:
    with pytest.raises(DeviceError, match="float32, float16, bfloat16"):
        resolve_placement("cpu", "int8")


def test_float32_on_cuda_turns_tf32_off() -> None:
    """cuDNN's default TF32 convolutions would move float32 results off the official's; only a
    float32 CUDA placement changes the switches (they are process-wide: a later bfloat16 load
    must not turn them back on under a float32 engine already serving)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        configure_backend(resolve_placement("cpu"))
        configure_backend(Placement(torch.device("cuda", 0), torch.bfloat16))
        assert torch.backends.cudnn.allow_tf32
        configure_backend(Placement(torch.device("cuda", 0), torch.float32))
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        configure_backend(Placement(torch.device("cuda", 0), torch.bfloat16))
        assert not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_cpu_without_matrix_instructions_for_the_dtype_is_told_so() -> None:
    """bfloat16/float16 on a CPU that emulates them runs, but slower than float32: the load says
    so (and suggests float32 with int8); float32, or a CPU with the instructions, says nothing."""
    features = cpu_features()
    assert features.capability and features.describe().startswith(features.capability)
    assert slow_precision_warning(resolve_placement("cpu")) is None
    for dtype, native in (
        ("bfloat16", features.bfloat16_products),
        ("float16", features.float16_products),
    ):
        warning = slow_precision_warning(resolve_placement("cpu", dtype))
        assert (warning is None) == native
        if warning is not None:
            assert f"no {dtype} matrix instructions" in warning and "--dtype float32" in warning
    assert slow_precision_warning(Placement(torch.device("cuda", 0), torch.bfloat16)) is None


def test_a_torch_device_is_taken_and_other_non_strings_refused() -> None:
    """torch.device('cpu') was an AttributeError; an int (torch's cuda:0) ran on the CPU
    silently; a quantisation that is not a name was an AttributeError."""
    from cosyvoice_lite.engine import Engine

    assert resolve_placement(torch.device("cpu")).device == torch.device("cpu")
    Engine.check_load_options(device=torch.device("cpu"))  # Engine.load's own check
    for device in (0, 1, 1.5, b"cpu"):
        with pytest.raises(DeviceError, match="'cuda:1', or a torch.device; got"):
            Engine.check_load_options(device=device)
    for quantize in (8, True):
        with pytest.raises(DeviceError, match=r"quantize must be a name \(int8\) or None"):
            Engine.check_load_options(quantize=quantize)
