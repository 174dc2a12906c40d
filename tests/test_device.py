"""Device and dtype are chosen once, at load; unavailable ones are clear errors."""

from __future__ import annotations

import pytest
import torch

from cosyvoice_lite.device import available_devices, resolve_placement
from cosyvoice_lite.errors import DeviceError


def test_cpu_and_dtypes() -> None:
    assert resolve_placement("cpu").dtype == torch.float32
    assert resolve_placement("CPU", "bf16").dtype == torch.bfloat16
    assert resolve_placement("cpu", "float16").dtype == torch.float16
    assert "cpu" in available_devices()


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "xpu:3", "tpu", "gpu"])
def test_unavailable_device_lists_what_is_available(device: str) -> None:
    if (
        device.split(":")[0] in {d.split(":")[0] for d in available_devices()}
        and device != "cuda:7"
    ):
        pytest.skip(f"{device} exists on this machine")
    with pytest.raises(DeviceError, match="available here: cpu"):
        resolve_placement(device)


def test_unknown_dtype() -> None:
    with pytest.raises(DeviceError, match="float32, float16, bfloat16"):
        resolve_placement("cpu", "int8")
