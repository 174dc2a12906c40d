"""This machine's physical floors, measured in the benchmark's own run (shared, noisy machines:
a figure from another day says little).

* memory bandwidth: a torch sum over a 1 GiB float32 tensor (decoding one token reads every
  weight once, so weight bytes / bandwidth is the floor of a decode step);
* matmul throughput: fp32 and bf16 square matrix products (the flow is compute-bound).
"""

from __future__ import annotations

import os
import time

import torch


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s read by a sum over ``gib`` GiB of float32 (best of ``repeats``)."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    seconds = _best(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matrix product in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = _best(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def measure() -> dict:
    """Every floor plus the load average, as one dict to print next to the results."""
    return {
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "memory_bandwidth_gbs": memory_bandwidth_gbs(),
        "fp32_gflops": matmul_gflops(torch.float32),
        "bf16_gflops": matmul_gflops(torch.bfloat16),
    }


def describe(floors: dict) -> str:
    load = ", ".join(f"{x:.2f}" for x in floors["load_average"])
    return (
        f"floors ({floors['threads']} threads): memory {floors['memory_bandwidth_gbs']:.1f} GB/s, "
        f"matmul fp32 {floors['fp32_gflops']:.0f} GFLOP/s, bf16 {floors['bf16_gflops']:.0f} "
        f"GFLOP/s; load average {load}"
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
