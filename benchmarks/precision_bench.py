"""What bench_v1.py and bench_v2v3.py share for issue 9: the precisions they compare, the
machine's floors measured in the same run (floors.py, plus torch's int8 dynamic linear), and
the check that makes a fixed-length run fail loudly.

    python benchmarks/precision_bench.py --threads 2     # the floors as one JSON line

The drivers import only the standard library, so they run this in a subprocess with the workers'
thread count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (Engine.load dtype, quantize). "int8" is int8 LLM linear layers and CosyVoice3's DiT
# products (W8A8) with the rest of the flow and the vocoder in bfloat16, or in float32 on a CPU
# that emulates bfloat16 (``configs``; precision.py).
CONFIGS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8")}


def _machine_table(floors: dict) -> dict[str, tuple[str, str | None]]:
    """``CONFIGS`` for this machine: int8 keeps the flow and the vocoder in float32 where
    bfloat16 has no instructions (``floors["bfloat16_products"]``), as a user of such a CPU is
    told to."""
    if floors.get("bfloat16_products", True):
        return CONFIGS
    return {**CONFIGS, "int8": ("float32", "int8")}


def configs(names: str, floors: dict) -> dict[str, tuple[str, str | None]]:
    """The configs named (comma-separated), as they run on this machine."""
    table = _machine_table(floors)
    return {name: table[name] for name in names.split(",")}


def flow_rate(name: str, floors: dict) -> float:
    """The matmul rate (GFLOP/s) config ``name``'s flow and vocoder compute at (the official:
    float32)."""
    dtype, _ = _machine_table(floors).get(name, ("float32", None))
    return floors["bf16_gflops" if dtype == "bfloat16" else "fp32_gflops"]


def int8_linear_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the LLM's int8 layers (``Int8Linear``, onnxruntime) on an n x n product."""
    import torch

    from cosyvoice_lite.quantized_linear import Int8Linear

    layer = Int8Linear(torch.nn.Linear(n, n), torch.get_num_threads())
    return _product_gflops(layer, torch.randn(n, n), repeats)


def int8_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s (int8 operations) of the flow's W8A8 products (``Int8MatmulLinear``: per-row
    activation quantisation, this CPU's int8 kernel, rescaling) on an n x n product (the
    onnxruntime kernel on one thread, as the flow's rows run one per thread)."""
    import torch

    from cosyvoice_lite.device import resolve_placement
    from cosyvoice_lite.precision import int8_product_kernel
    from cosyvoice_lite.quantized_linear import Int8MatmulLinear

    kernel = int8_product_kernel(resolve_placement("cpu", quantize="int8"))
    layer = Int8MatmulLinear(torch.nn.Linear(n, n), kernel)
    return _product_gflops(layer, torch.randn(n, n, dtype=torch.bfloat16), repeats)


def _product_gflops(layer, x, repeats: int) -> float:
    """GFLOP/s of ``layer`` (n x n) on ``x`` (n x n): the best of ``repeats`` calls after one."""
    import time

    n = x.shape[0]
    layer(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def measure_floors(threads: int) -> dict:
    """Run the floor measurements in a subprocess with ``threads`` torch threads."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads)],
        capture_output=True,
        text=True,
        cwd=HERE,
    )
    if out.returncode != 0:  # its error, not a bare CalledProcessError
        raise SystemExit(f"measuring the floors failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_fixed_length(
    name: str, tokens: int, samples: int, per_token: float, tolerance: int
) -> None:
    """Fail loudly unless ``samples`` is what ``tokens`` speech tokens make: otherwise the length
    hook (``max_speech_tokens`` + ``ignore_eos``, or the official's patched sampler) did not fire
    and every figure of the run is void."""
    expected = tokens * per_token
    if abs(samples - expected) > tolerance:
        raise SystemExit(
            f"FIXED LENGTH NOT APPLIED ({name}): {tokens} speech tokens make {expected:.0f} "
            f"samples, the output has {samples}: the length hook did not fire"
        )


def llm_bytes_per_token(llm) -> int:
    """Bytes of LLM weights one decoding step reads: every weight except embedding tables (one
    row each), v1's text encoder (run once per request, on the text) and v1's positional
    projections (``linear_pos``: their rows are a table shared by all requests, projected once
    per 256 distances, conformer.ProjectedPositions); int8 layers count their int8 weights plus
    float32 scales and biases."""
    from torch import nn

    from cosyvoice_lite.precision import PackedLinear, tied_to_embeddings
    from cosyvoice_lite.quantized_linear import Int8Linear

    once = [m for name, m in llm.named_children() if name.startswith("text_encoder")]
    once += [m for name, m in llm.named_modules() if name.endswith(".linear_pos")]
    skip = {id(m) for top in once for m in top.modules()}
    skip |= {id(m) for m in tied_to_embeddings(llm)}  # Qwen2's lm_head: never run
    total = 0
    for module in llm.modules():
        if isinstance(module, nn.Embedding) or id(module) in skip:
            continue
        if isinstance(module, PackedLinear):  # packed weights are buffers
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            continue
        if isinstance(module, Int8Linear):  # its weights live in onnxruntime
            total += module.nbytes
            continue
        for p in module.parameters(recurse=False):
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    threads = parser.parse_args().threads
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from floors import measure

    from cosyvoice_lite.device import cpu_features

    floors = measure()
    floors["bfloat16_products"] = cpu_features().bfloat16_products
    floors["int8_gflops"] = int8_linear_gflops()
    # with this CPU's kernel (torch._int_mm with VNNI/AMX, onnxruntime's without)
    floors["w8a8_gflops"] = int8_matmul_gflops()
    print(json.dumps(floors))


if __name__ == "__main__":
    main()


def ratio_labels(names: list[str]) -> list[str]:
    """The ratio columns of a table over ``names`` (our configs, then maybe "official"): the
    official over each of ours, and fp32 over each lower precision (x > 1: faster than that)."""
    ours = [n for n in names if n != "official"]
    labels = [f"official/{n}" for n in ours] if "official" in names else []
    return labels + [f"fp32/{n}" for n in ours if n != "fp32" and "fp32" in ours]


def ratios(values: dict[str, float], names: list[str]) -> list[float]:
    out = []
    for label in ratio_labels(names):
        top, bottom = label.split("/")
        out.append(values[top] / values[bottom] if values[bottom] > 0 else float("nan"))
    return out


def print_floors(floors: dict, results: dict, names: list[str], tokens: int, flops: dict) -> None:
    """The floors measured in this run and how far each implementation is from them."""
    bandwidth = floors["memory_bandwidth_gbs"]
    print()
    print(
        f"floors measured in this run ({floors['threads']} threads): memory {bandwidth:.1f} GB/s; "
        f"matmul fp32 {floors['fp32_gflops']:.0f} (torch's default product "
        f"{floors.get('fp32_default_gflops', floors['fp32_gflops']):.0f}), "
        f"bf16 {floors['bf16_gflops']:.3g}, int8 (LLM "
        f"layers) {floors['int8_gflops']:.0f}, int8 W8A8 (flow products) "
        f"{floors.get('w8a8_gflops') or float('nan'):.0f} GFLOP/s; cpu {floors.get('cpu', '?')}"
    )
    for name in names:
        per_token = results[name].get("llm_bytes_per_token")
        line = f"  {name:<9}"
        if per_token:
            floor_ms = per_token / bandwidth / 1e6
            line += f" LLM weights read per token {per_token / 1e9:.2f} GB -> floor {floor_ms:.1f} ms/token"
            measured = results[name].get("llm_ms_per_token")
            if measured:
                line += (
                    f"; measured {measured:.1f} ms/token (median step) = {measured / floor_ms:.2f}x"
                )
        for stage in ("flow", "hift"):
            if stage in flops and not flops[stage]:
                # FLOPs are counted in the calling thread: rows computed on helper threads are not
                line += f"; {stage} FLOPs not counted (run fp32 first)"
            elif stage in flops and results[name].get(f"{stage}_s"):
                rate = flow_rate(name, floors)
                floor_s = flops[stage] / rate / 1e9
                line += (
                    f"; {stage} {flops[stage] / 1e9:.0f} GFLOP -> floor {floor_s:.2f} s, measured "
                    f"{results[name][f'{stage}_s']:.2f} s = {results[name][f'{stage}_s'] / floor_s:.1f}x"
                )
        print(line)
