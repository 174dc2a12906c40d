"""Per-stage speed of the onnxruntime backend against torch, in one run, on a full-size model.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_onnx.py --model benchmarks/out/CosyVoice-300M-SFT

(the directory comes from `tools/make_models.py --size full`). The flow and vocoder are exported
once into benchmarks/out/onnx-<model name>/ (float32; int8 copies made by onnxruntime's dynamic
quantisation on first use). Then, alternating implementations within each round so that machine
load hits them alike, it times:

* flow: `flow.inference` for a fixed token count (encoder in torch, 10 Euler steps of the
  estimator in torch / onnxruntime float32 / onnxruntime int8);
* vocoder: `hift.inference` on the resulting mel (torch / onnxruntime float32 / int8).

and prints the median and the floor (fastest round) per stage, the ratios to torch, the largest
difference from torch's output, the exported sizes and the load average before and after.
Thread counts: torch's default, and the same for onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from cosyvoice_lite.export.onnx_export import export_onnx, load_networks  # noqa: E402
from cosyvoice_lite.export.runtime import (  # noqa: E402
    INT8_OPS,
    quantized,
    read_manifest,
    use_onnxruntime,
)


def timed(fn, rounds: int) -> tuple[list[float], object]:  # noqa: ANN001
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.inference_mode():
            result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="full-size model directory (make_models.py)")
    parser.add_argument("--out", help="export directory (default benchmarks/out/onnx-<name>)")
    parser.add_argument("--tokens", type=int, default=100, help="speech tokens flowed per call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = Path(args.model)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"onnx-{model.name}"
    load_before = os.getloadavg()
    if not (out / "manifest.json").is_file():
        # only into a new or empty directory: --out may name one with someone's files
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise SystemExit(f"{out} has files but no manifest.json: name a new or empty --out")
        start = time.perf_counter()
        export_onnx(model, out, parts=("flow", "hift"), progress=print)
        print(f"exported in {time.perf_counter() - start:.0f} s")
    manifest = read_manifest(out)
    version = manifest["model"]["version"]

    variants = {"torch": load_networks(model, ("flow", "hift"))[1]}
    variants["ort fp32"] = use_onnxruntime(load_networks(model, ("flow", "hift"))[1], out)
    variants["ort int8"] = use_onnxruntime(
        load_networks(model, ("flow", "hift"))[1], out, int8=True
    )

    g = torch.Generator().manual_seed(0)
    token = torch.randint(0, 4096, (1, args.tokens), generator=g)
    n = torch.tensor([args.tokens])
    empty, no_feat = torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, 0, 80)
    zero = torch.tensor([0])
    embedding = torch.randn(1, 192, generator=g)

    def flow_call(nets):  # noqa: ANN001, ANN202
        flow = nets["flow"]
        if version == 1:
            return lambda: flow.inference(
                token,
                n,
                empty,
                zero,
                no_feat,
                zero,
                embedding,
                None,
                torch.Generator().manual_seed(1),
            )[0]
        return lambda: flow.inference(
            token, n, empty, zero, no_feat, zero, embedding, streaming=False, finalize=True
        )[0]

    with torch.inference_mode():
        mel = flow_call(variants["torch"])()

    def hift_call(nets):  # noqa: ANN001, ANN202
        if version == 3:
            return lambda: nets["hift"].inference(mel)[0]
        return lambda: nets["hift"].inference(mel, None, torch.Generator().manual_seed(2))[0]

    stages = {"flow": flow_call, "vocoder": hift_call}
    times = {(s, v): [] for s in stages for v in variants}
    outputs = {}
    for _ in range(args.rounds):
        for stage, make in stages.items():
            for name, nets in variants.items():  # alternate implementations every round
                spent, result = timed(make(nets), 1)
                times[stage, name] += spent
                outputs[stage, name] = result

    audio = mel.shape[2] * manifest["hift"]["samples_per_frame"] / manifest["model"]["sample_rate"]
    print(
        f"\n{manifest['model']['name']} (v{version}): {args.tokens} tokens -> {mel.shape[2]} mel "
        f"frames, {audio:.2f} s of audio; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {args.rounds} rounds"
    )
    print(
        f"{'stage':8} {'backend':9} {'median s':>9} {'floor s':>8} {'vs torch':>9} {'RTF':>6} "
        f"{'max |diff|':>11}"
    )
    for stage in stages:
        base = statistics.median(times[stage, "torch"])
        for name in variants:
            t = times[stage, name]
            diff = (outputs[stage, name] - outputs[stage, "torch"]).abs().max().item()
            print(
                f"{stage:8} {name:9} {statistics.median(t):9.3f} {min(t):8.3f} "
                f"{base / statistics.median(t):8.2f}x {statistics.median(t) / audio:6.3f} {diff:11.2e}"
            )
    print("\nexported sizes (MB):")
    for name, entry in manifest["graphs"].items():
        path = out / entry["file"]
        ops = INT8_OPS[name.split("_")[0]]
        int8 = (
            quantized(path, ops).stat().st_size / 1e6
            if name in ("flow_estimator", "hift")
            else None
        )
        print(
            f"  {name:22} fp32 {path.stat().st_size / 1e6:8.1f}"
            + (f"   int8 {int8:8.1f}" if int8 else "")
        )
    print(f"load average before {load_before}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
