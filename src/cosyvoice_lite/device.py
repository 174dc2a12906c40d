"""Device and dtype resolution. Called once, at load; everything below receives the result."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import DeviceError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Accelerator back-ends torch may expose (Apple's MPS is not one we run on: it has no float64).
ACCELERATOR_KINDS = ("cuda", "xpu", "npu", "mlu", "hpu")


def dtype_named(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype an option names ("float16", "fp16", "Half", torch.float16; None:
    float32), or None for a name of no dtype we take."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, str | None):
        return None
    return _DTYPES.get((dtype or "float32").strip().lower())


def _backend_count(kind: str) -> int:
    module = getattr(torch, kind, None)  # torch.npu appears once torch_npu is imported, etc.
    if module is None:
        return 0
    try:
        if not module.is_available():
            return 0
        return int(module.device_count()) if hasattr(module, "device_count") else 1
    except (RuntimeError, AssertionError):  # a back-end compiled in but with no driver
        return 0


def available_devices() -> list[str]:
    """Every device string usable on this machine, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    found = ["cpu"]
    for kind in ACCELERATOR_KINDS:
        count = _backend_count(kind)
        found += [f"{kind}:{i}" for i in range(count)]
    return found


@dataclass(frozen=True)
class Placement:
    """Where the networks run and in which precision, chosen once at load.

    ``dtype`` is the dtype the weights are stored in and computed with (not autocast): the LLM, the
    flow and the vocoder, except the few parts ``precision.apply_precision`` keeps in float32/64.
    ``quantize`` ("int8" or None) gives the LLM's linear layers int8 weights (onnxruntime's
    block-quantised ``MatMulNBits``, see quantized_linear.py; float32 elsewhere in the LLM) and
    the flow's declared ``int8_products`` W8A8 layers (CosyVoice3's DiT; ``dtype`` elsewhere).
    ``exact_float32``: float32 keeps the official's kernels and operations, which reproduces its
    floats on the same CPU (the parity tests); otherwise a CPU runs the linear layers with
    oneDNN-packed weights (precision.PackedLinear), which sum in another order (~1e-6 relative)
    and were 2.1-2.7x faster per product on an AVX-512 AMD CPU, where torch's MKL products run
    AVX2 code, the vocoder's convolutions channels-last (networks/conv_layout.py) and
    CosyVoice-300M's cached attention as one fused call.
    """

    device: torch.device
    dtype: torch.dtype
    quantize: str | None = None
    exact_float32: bool = False


_QUANTIZE = ("int8",)


@dataclass(frozen=True)
class CpuFeatures:
    """The matrix instructions of this CPU that decide which precision pays on it.

    ``bfloat16_products``: AVX512-BF16 or AMX (Intel Cooper Lake / Sapphire Rapids on, AMD Zen 4
    on). Without them torch emulates bfloat16 products: on an AVX2-only AMD EPYC (Zen 3) a
    bfloat16 linear layer ran ~5x slower than float32 and a one-row product (LLM decoding) ~3x.
    ``int8_products``: VNNI (AVX512-VNNI or AVX-VNNI) or AMX, which ``torch._int_mm`` needs to be
    fast: on that EPYC it ran at ~0.7 GOP/s, ~100x below float32 (the W8A8 products use
    onnxruntime's AVX2 kernel there, precision.int8_product_kernel). ``float16_products``: AMX-FP16.
    ``packs_bfloat16``: oneDNN packs bfloat16 linear weights (it needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT and refuses elsewhere; asked of oneDNN itself on a tiny weight). ``amx``: AMX
    tiles (Intel Sapphire Rapids on), where oneDNN multiplies packed bfloat16 weights on the tiles
    and sums in another order than torch's plain bfloat16 product (the same within bfloat16's
    rounding, not the same floats).
    """

    capability: str
    bfloat16_products: bool
    int8_products: bool
    float16_products: bool
    packs_bfloat16: bool
    amx: bool = False

    def describe(self) -> str:
        have = [
            name
            for name, present in (
                ("bf16", self.bfloat16_products),
                ("int8", self.int8_products),
                ("fp16", self.float16_products),
            )
            if present
        ]
        tiles = " (AMX)" if self.amx else ""
        return f"{self.capability}{tiles}, native products: {', '.join(['fp32', *have])}"


@functools.cache
def cpu_features() -> CpuFeatures:
    """This CPU's ``CpuFeatures``, read once (torch's own cpuinfo probes, as its compiler uses)."""

    def probe(name: str) -> bool:
        check = getattr(torch.cpu, name, None)  # private probes: absent in another torch
        return bool(check()) if check is not None else False

    amx = probe("_is_amx_tile_supported")
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        bfloat16_products=amx or probe("_is_avx512_bf16_supported"),
        int8_products=amx or probe("_is_vnni_supported"),
        float16_products=probe("_is_amx_fp16_supported"),
        packs_bfloat16=_onednn_packs_bfloat16(),
        amx=amx,
    )


def _onednn_packs_bfloat16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


def slow_precision_warning(placement: Placement) -> str | None:
    """What to tell a user whose CPU has no instructions for the chosen dtype (it still runs,
    in less memory, but slower than float32), or None."""
    if placement.device.type != "cpu" or placement.dtype == torch.float32:
        return None
    features = cpu_features()
    native = {torch.bfloat16: features.bfloat16_products, torch.float16: features.float16_products}
    if native.get(placement.dtype, True):
        return None
    name = str(placement.dtype).removeprefix("torch.")
    return (
        f"this CPU ({features.describe()}) has no {name} matrix instructions: {name} weights "
        f"take half the memory but compute several times slower than float32 here; for speed "
        f"use --dtype float32 (with --quantize int8 for the LLM)"
    )


def supported_precisions(device: torch.device) -> tuple[list[str], list[str]]:
    """The dtypes and quantisations usable on ``device`` (names as accepted by the options)."""
    if device.type == "cpu":
        return ["float32", "bfloat16", "float16"], list(_QUANTIZE)
    # (bfloat16 where the GPU computes it, Ampere on: older ones only emulate it, slowly)
    if device.type == "cuda" and torch.cuda.is_available() and not _cuda_bf16():
        return ["float32", "float16"], []
    return ["float32", "bfloat16", "float16"], []  # the int8 kernels are CPU ones


def _cuda_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.is_bf16_supported()


def device_name(device: str | torch.device | None) -> str:
    """The device option as a name: a string, or a torch.device (its str; None: cpu). Anything
    else is refused: an int is an accelerator's index to torch (0: cuda:0), and ran on the CPU."""
    if isinstance(device, torch.device):
        return str(device)
    if device is not None and not isinstance(device, str):
        raise DeviceError(
            f"device must be a name such as 'cpu', 'cuda' or 'cuda:1', or a torch.device; "
            f"got {device!r} ({type(device).__name__})"
        )
    return device or "cpu"


def resolve_placement(
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    quantize: str | None = None,
    exact_float32: bool = False,
) -> Placement:
    """Check that ``device`` exists here and that ``dtype`` and ``quantize`` are supported there;
    fail with the choices. ``exact_float32``: see ``Placement``."""
    device = device_name(device)
    name = device.strip().lower()
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(
            f"unknown device '{device}'; available here: {', '.join(available_devices())}"
        ) from exc
    if dev.type == "cpu":
        if dev.index not in (None, 0):  # torch has one CPU device: "cpu:1" would mean all
            raise DeviceError(
                f"unknown device '{device}': the CPU is 'cpu' (its cores: the threads option)"
            )
        dev = torch.device("cpu")  # "cpu:0" too, so that devices compare equal
    if dev.type == "mps":  # checked before its availability: the answer is the same
        raise DeviceError(
            "device 'mps' is not supported: Apple's MPS has no float64, which the vocoders' "
            "phase and CosyVoice3's f0 predictor compute in (as the official); use 'cpu'"
        )
    if dev.type != "cpu":
        count = _backend_count(dev.type)
        index = dev.index or 0
        if count == 0 or index >= count:
            raise DeviceError(
                f"device '{device}' is not available on this machine; "
                f"available here: {', '.join(available_devices())} (no torch build for it? "
                "`cosyvoice-lite export onnx` makes graphs for its own runtime: docs/EXPORT.md)"
            )
        if dev.index is None:
            dev = torch.device(dev.type, 0)
    chosen, mode = check_precision(dev, dtype, quantize)
    if exact_float32 and chosen != torch.float32:
        raise DeviceError(
            f"exact float32 applies to float32 weights (dtype float32); got dtype '{dtype}'"
        )
    return Placement(dev, chosen, mode, exact_float32)


def configure_backend(placement: Placement, fresh: bool = False) -> None:
    """Process-wide settings the placement needs, applied once at load: float32 on CUDA computes
    in float32, as on a CPU. torch lets cuDNN run float32 convolutions in TF32 by default (10-bit
    mantissas), which would move the flow's and the vocoder's float32 outputs away from the
    official float32 results; the matrix products' TF32 switch is off by default and kept off.
    Other dtypes leave the switches as they are: they are process-wide, and a float32 engine
    loaded earlier in the process may be serving. ``fresh``: torch's defaults first, as in a
    process that loads only this placement (benchmarks that load several in turn)."""
    if placement.device.type == "cuda" and fresh:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    if placement.device.type == "cuda" and placement.dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def check_precision(
    device: torch.device, dtype: str | torch.dtype = "float32", quantize: str | None = None
) -> tuple[torch.dtype, str | None]:
    """The torch dtype and quantisation mode for the option values (``dtype`` a name or a torch
    dtype), or a DeviceError naming what is supported on ``device``."""
    chosen = dtype_named(dtype)
    if chosen is None:
        raise DeviceError(f"unknown dtype '{dtype}'; use one of float32, float16, bfloat16")
    dtypes, quants = supported_precisions(device)
    if str(chosen).removeprefix("torch.") not in dtypes:
        raise DeviceError(
            f"dtype '{dtype}' is not supported on {device}; supported there: {', '.join(dtypes)}"
        )
    if quantize is not None and not isinstance(quantize, str):
        raise DeviceError(
            f"quantize must be a name ({', '.join(_QUANTIZE)}) or None; "
            f"got {quantize!r} ({type(quantize).__name__})"
        )
    mode = (quantize or "").strip().lower() or None
    if mode is not None and mode not in _QUANTIZE:
        raise DeviceError(f"unknown quantisation '{quantize}'; use one of: {', '.join(_QUANTIZE)}")
    if mode is not None and mode not in quants:
        raise DeviceError(
            f"quantisation '{quantize}' is not supported on {device}; supported there: "
            f"{', '.join(quants) or 'none'} (int8 runs on cpu)"
        )
    return chosen, mode
