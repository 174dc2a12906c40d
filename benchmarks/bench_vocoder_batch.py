"""Whole utterances vocoded as one padded batch vs one by one (v1/v2/v3 vocoders).

One command: ``python benchmarks/bench_vocoder_batch.py --model DIR [--utterances 1,2,4,8]
[--frames 200] [--dtype float32] [--device cpu] [--repeats 3]``. For each count U, U random mels
of different lengths (``--frames`` x 1.0, 0.9, 0.8, ... down to 0.6, cycling; 50 frames a second
for v2/v3) go through the model's vocoder two ways in the same run: ``inference`` per utterance
(the previous design) and one ``inference_rows`` call (what the engine does for whole utterances
that end together). Printed per U: best time of both, the speed-up, the audio seconds per wall
second of the batch, and the largest difference between a row and the same utterance alone
(the f0 and source are per row, so it is rounding of the batched convolutions only). The machine's
load average and floors come from the same run (on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from floors import describe, footer, measure  # noqa: E402

from cosyvoice_lite.engine import Engine  # noqa: E402


def vocode_alone(hift: torch.nn.Module, mel: torch.Tensor, seed: int) -> torch.Tensor:
    if getattr(hift, "causal", False):
        return hift.inference(mel, finalize=True)[0]
    return hift.inference(mel, None, torch.Generator().manual_seed(seed))[0]


def vocode_rows(hift: torch.nn.Module, mels: list[torch.Tensor]) -> list[torch.Tensor]:
    if getattr(hift, "causal", False):
        return hift.inference_rows(mels)
    return hift.inference_rows(mels, [torch.Generator().manual_seed(i) for i in range(len(mels))])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size model directory")
    parser.add_argument("--utterances", default="1,2,4,8")
    parser.add_argument("--frames", type=int, default=200, help="mel frames of the longest")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    device = torch.device(args.device)
    floors = describe(measure()) if device.type == "cpu" else None
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device)
    hift = engine.pipeline.hift
    rate = engine.sample_rate
    g = torch.Generator().manual_seed(0)
    scales = (1.0, 0.9, 0.8, 0.7, 0.6)
    print(
        f"{args.model.name} {args.dtype} on {device}, {args.threads} threads: vocoder "
        f"{type(hift).__name__}, longest utterance {args.frames} mel frames",
        flush=True,
    )
    print(
        f"{'utterances':>10}{'one by one s':>14}{'together s':>12}{'speed-up':>10}"
        f"{'audio s/s':>11}{'max diff':>10}"
    )
    for count in (int(c) for c in args.utterances.split(",")):
        lengths = [int(args.frames * scales[i % len(scales)]) for i in range(count)]
        mels = [torch.randn(1, 80, n, generator=g).to(device) for n in lengths]
        alone_best = together_best = float("inf")
        with torch.inference_mode():
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                alone = [vocode_alone(hift, mel, i) for i, mel in enumerate(mels)]
                sync(device)
                alone_best = min(alone_best, time.perf_counter() - start)
                start = time.perf_counter()
                together = vocode_rows(hift, mels)
                sync(device)
                together_best = min(together_best, time.perf_counter() - start)
        samples = [a.shape[1] for a in alone]
        if samples != [t.shape[1] for t in together]:
            raise SystemExit(f"LENGTHS DIFFER: alone {samples}, together {together}")
        diff = max(float((a - b).abs().max()) for a, b in zip(alone, together, strict=True))
        audio = sum(samples) / rate
        print(
            f"{count:>10}{alone_best:>14.3f}{together_best:>12.3f}"
            f"{alone_best / together_best:>9.2f}x{audio / together_best:>11.1f}{diff:>10.1e}",
            flush=True,
        )
    if floors is not None:
        print(footer(floors, load_start))
    else:
        print(f"load average at start {load_start}, at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
