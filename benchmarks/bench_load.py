"""Loading a model: how long it takes and how much memory it needs on the way, ours against an
earlier checkout of the code.

One command: ``python benchmarks/bench_load.py --model DIR [--configs fp32,int8] [--rounds 2]
[--baseline SRC]``. Each load runs in a fresh process (``Engine.load``, the page cache warm after
the first round) while a thread samples the process's resident memory every 10 ms: its anonymous
part (the process's own memory, what the OS cannot take back), its file part (the pages of the
memory-mapped checkpoints, which the OS may reclaim) and their sum, at their peaks during the
load and after it. ``--baseline`` names the ``src`` directory of another checkout (``git worktree
add /tmp/before REV``: ``/tmp/before/src``), loaded the same way in the same rounds, alternating,
so the printed ratios compare the two designs on the same machine state. The floors (memory
bandwidth, matmul throughput) and the load average of the run close the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"RssAnon": "anon", "RssFile": "file", "VmRSS": "rss"}
CONFIGS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8")}


def resident_mib() -> dict[str, int]:
    """This process's resident memory in MiB: anonymous, file-backed and their sum."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in FIELDS:
                values[FIELDS[key]] = int(line.split()[1]) // 1024
    return values


def child(model: Path, config: str, threads: int) -> None:
    """Load once, sampling memory; print one JSON line."""
    import torch

    torch.set_num_threads(threads)
    import cosyvoice_lite
    from cosyvoice_lite.engine import Engine

    peaks = resident_mib()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            for key, value in resident_mib().items():
                peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    dtype, quantize = CONFIGS[config]
    sampler.start()
    start = time.perf_counter()
    engine = Engine.load(model, dtype=dtype, quantize=quantize, download=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = resident_mib()
    for key, value in after.items():
        peaks[key] = max(peaks[key], value)
    engine.close()
    print(
        json.dumps(
            {"source": cosyvoice_lite.__file__, "seconds": seconds, "peak": peaks, "after": after}
        )
    )


def load_in_child(src: Path, model: Path, config: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, __file__, "--child", "--model", str(model), "--configs", config]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"loading from {src} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["source"]).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"the child imported {result['source']}, not the code under {src}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a full-size model directory")
    parser.add_argument("--configs", default="fp32,int8", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="the src directory of another checkout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.configs, args.threads)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floors import describe, footer, measure

    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}: use {', '.join(CONFIGS)}")
    designs = {"ours": ROOT / "src"}
    if args.baseline is not None:
        designs["baseline"] = args.baseline
    load_start = os.getloadavg()
    floors = describe(measure())
    runs: dict[tuple[str, str], list[dict]] = {}
    for number in range(args.rounds):
        for config in configs:
            for design, src in designs.items():
                result = load_in_child(src, args.model, config, args.threads)
                runs.setdefault((design, config), []).append(result)
                print(
                    f"round {number} {design:<9}{config:<6}{result['seconds']:6.1f} s  peak "
                    f"{json.dumps(result['peak'])}  after {json.dumps(result['after'])}",
                    flush=True,
                )
    print(f"\n{args.model.name}, {args.threads} threads, medians of {args.rounds} (MiB, s)")
    header = ("design", "config", "load s", "peak anon", "peak file", "peak rss", "after anon")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    medians = {}
    for (design, config), results in runs.items():
        row = {
            "seconds": statistics.median(r["seconds"] for r in results),
            **{
                f"peak {k}": statistics.median(r["peak"][k] for r in results)
                for k in FIELDS.values()
            },
            "after anon": statistics.median(r["after"]["anon"] for r in results),
        }
        medians[design, config] = row
        cells = [f"{row['seconds']:.1f}"] + [f"{row[k]:.0f}" for k in header[3:]]
        print(f"| {design} | {config} | " + " | ".join(cells) + " |")
    if "baseline" in designs:
        for config in configs:
            ours, before = medians["ours", config], medians["baseline", config]
            print(
                f"{config}: load {before['seconds'] / ours['seconds']:.2f}x faster, peak anon "
                f"{before['peak anon'] / ours['peak anon']:.2f}x and peak rss "
                f"{before['peak rss'] / ours['peak rss']:.2f}x smaller than the baseline"
            )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
