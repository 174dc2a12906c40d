"""This machine's physical floors, measured in the benchmark's own run (shared, noisy machines:
a figure from another day says little).

* memory bandwidth: a torch sum over a float32 tensor (1 GiB on a CPU, 4 GiB on a GPU; decoding
  one token reads every weight once, so weight bytes / bandwidth is the floor of a decode step);
* matmul throughput: square matrix products in fp32 and bf16 (and fp16 on a GPU; the flow is
  compute-bound), 2048 wide on a CPU, 8192 on a GPU. On a CPU the fp32 rate is the better of
  torch's default product (MKL) and oneDNN's with a packed weight (what the engine's float32 linear
  layers run, precision.PackedLinear): on an AVX-512 AMD CPU MKL runs AVX2 code at half the
  rate, so the default alone would understate the machine (``fp32_default_gflops`` keeps it).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (a GPU runs asynchronously), or does nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _best(fn, repeats: int, device: torch.device | None = None) -> float:
    sync = _synchronizer(device or torch.device("cpu"))
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """GB/s read by a sum over ``gib`` GiB of float32 (best of ``repeats``)."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32, device=device)
    seconds = _best(lambda: x.sum(), repeats, x.device)
    return x.numel() * 4 / seconds / 1e9


def matmul_gflops(
    dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5, device: str = "cpu"
) -> float:
    """GFLOP/s of an n x n matrix product in ``dtype`` (best of ``repeats``). On a CPU without
    instructions for ``dtype`` (bfloat16 on an AVX2-only CPU runs at ~0.5 GFLOP/s) a smaller
    product is timed, sized from a 256-wide probe so that one product takes ~0.3 s."""
    if torch.device(device).type == "cpu" and n > 256:
        probe = _matmul_rate(dtype, 256, 1, device)
        n = min(n, max(256, int((0.3 * probe / 2) ** (1 / 3))))
    return _matmul_rate(dtype, n, repeats, device) / 1e9


def _matmul_rate(dtype: torch.dtype, n: int, repeats: int, device: str) -> float:
    """FLOP/s of an n x n product in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _best(lambda: a @ b, repeats, a.device)
    return 2 * n**3 / seconds


def measure(device: str = "cpu") -> dict:
    """Every floor plus the load average, as one dict to print next to the results."""
    on_cpu = torch.device(device).type == "cpu"
    n = 2048 if on_cpu else 8192
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if not on_cpu:
        dtypes["fp16"] = torch.float16
    floors = {
        "device": device if on_cpu else f"{device} ({torch.cuda.get_device_name(device)})",
        "cpu": _cpu_description(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "memory_bandwidth_gbs": memory_bandwidth_gbs(1.0 if on_cpu else 4.0, device=device),
    }
    for name, dtype in dtypes.items():
        floors[f"{name}_gflops"] = matmul_gflops(dtype, n, device=device)
    if on_cpu and torch.backends.mkldnn.is_available():
        floors["fp32_default_gflops"] = floors["fp32_gflops"]
        floors["fp32_gflops"] = max(floors["fp32_gflops"], packed_matmul_gflops(n))
    return floors


def packed_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n float32 product by oneDNN with the weight packed once (CPU)."""
    weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, n), 1)
    x = torch.randn(n, n)
    seconds = _best(
        lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""), repeats
    )
    return 2 * n**3 / seconds / 1e9


def _cpu_description() -> str:
    """The CPU model and its matrix instructions (which precisions are native: an AVX2-only CPU
    emulates bfloat16, and its int8 products are slow)."""
    from cosyvoice_lite.device import cpu_features

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{name}, {cpu_features().describe()}"


def describe(floors: dict) -> str:
    load = ", ".join(f"{x:.2f}" for x in floors["load_average"])
    matmul = ", ".join(
        f"{name} {floors[f'{name}_gflops']:.3g}"
        for name in ("fp32", "bf16", "fp16")
        if f"{name}_gflops" in floors
    )
    if "fp32_default_gflops" in floors:
        matmul += f" (fp32 by torch's default product {floors['fp32_default_gflops']:.3g})"
    where = floors.get("device", "cpu")
    where = f"{floors['threads']} threads" if where == "cpu" else f"{where}"
    cpu = f"; cpu {floors['cpu']}" if "cpu" in floors else ""
    return (
        f"floors ({where}): memory {floors['memory_bandwidth_gbs']:.1f} GB/s, "
        f"matmul {matmul} GFLOP/s; load average {load}{cpu}"
    )


def footer(floors: str, load_start: tuple[float, ...]) -> str:
    """The closing lines of a benchmark: the floors measured in its run (``describe``) and the
    load average at its start and now."""
    end = os.getloadavg()
    return (
        f"floors measured in this run: {floors}\n"
        f"load average at start {load_start[0]:.2f}, at end {end[0]:.2f} "
        f"(on {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    print(describe(measure()))
