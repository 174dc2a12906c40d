"""The vocoders' convolutions over channels-last activations vs torch's default layout (v1/v2/v3).

One command: ``python benchmarks/bench_conv_layout.py [--versions 1,2,3] [--dtypes
float32,bfloat16] [--seconds 4] [--rounds 3]``. Each version's full-size random-weight vocoder
(benchmarks/out/, generated with tools/make_models.py if absent) is loaded as the engine loads it,
which stores its convolution weights channels-last on a CPU (``precision.stores_channels_last``;
``networks/conv_layout.py``). One random mel of ``--seconds`` of audio is vocoded in the same
process with the weights in the default layout (the previous design) and channels-last, in
alternation, ``--rounds`` times each (after a warm-up of each). Printed per version and dtype: the
median time of both, the speed-up, the real-time factor channels-last, and the largest difference
between the two waveforms (bfloat16: the same floats measured on an AMX CPU; float32: oneDNN's
summation order). The load average and this machine's floors come from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_v1 import ensure_model as ensure_v1  # noqa: E402
from bench_v2v3 import ensure_model as ensure_v2v3  # noqa: E402
from floors import describe, footer, measure  # noqa: E402

from cosyvoice_lite.device import resolve_placement  # noqa: E402
from cosyvoice_lite.modeldir import open_model_dir  # noqa: E402
from cosyvoice_lite.networks.conv_layout import is_channels_last, to_channels_last  # noqa: E402
from cosyvoice_lite.pipelines.factory import load_network  # noqa: E402

MODELS = {
    1: "CosyVoice-300M-SFT",
    2: "CosyVoice2-0.5B",
    3: "Fun-CosyVoice3-0.5B-2512",
}


def vocode(hift: torch.nn.Module, mel: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        if getattr(hift, "causal", False):
            wave = hift.inference(mel, finalize=True)[0]
        else:
            wave = hift.inference(mel, None, torch.Generator().manual_seed(1))[0]
    return time.perf_counter() - start, wave


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default="1,2,3")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per vocoder call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    print(
        f"{'model':<26}{'dtype':<10}{'default s':>10}{'channels-last s':>17}{'speed-up':>10}"
        f"{'RTF':>7}{'max diff':>10}",
        flush=True,
    )
    for version in (int(v) for v in args.versions.split(",")):
        model_dir = ROOT / "benchmarks" / "out" / MODELS[version]
        if version == 1:
            ensure_v1(model_dir)
        else:
            ensure_v2v3(model_dir, version)
        model = open_model_dir(model_dir)
        for dtype in args.dtypes.split(","):
            placement = resolve_placement("cpu", dtype)
            hift = load_network(model, "hift", "hift.pt", placement)
            convs = [
                m
                for m in hift.modules()
                if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))
                and is_channels_last(m.weight)
            ]
            if not convs:
                raise SystemExit(f"NO CHANNELS-LAST CONVOLUTIONS in the {dtype} vocoder: not run")
            frames = round(args.seconds * hift.sampling_rate / hift.upsample_scale)
            mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0)) - 4
            times: dict[bool, list[float]] = {False: [], True: []}
            waves: dict[bool, torch.Tensor] = {}
            for round_ in range(args.rounds + 1):
                for channels_last in (False, True):
                    for conv in convs:
                        weight = conv.weight.data
                        conv.weight.data = (
                            to_channels_last(weight) if channels_last else weight.contiguous()
                        )
                    seconds, waves[channels_last] = vocode(hift, mel)
                    if round_:  # the first round warms both up
                        times[channels_last].append(seconds)
            default, fast = (statistics.median(times[c]) for c in (False, True))
            diff = float((waves[False] - waves[True]).abs().max())
            print(
                f"{MODELS[version]:<26}{dtype:<10}{default:>10.3f}{fast:>17.3f}"
                f"{default / fast:>9.2f}x{fast / args.seconds:>7.3f}{diff:>10.1e}",
                flush=True,
            )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
