"""What handing freed memory back to the OS between requests saves, and what it costs the next one.

One command: ``python benchmarks/bench_idle_release.py --model DIR [--tokens 100] [--rounds 6]
[--dtype float32] [--stream | --no-stream]``. The engine loads with its idle release off, a saved
voice's first stream computes the voice's prompt frames, then rounds alternate the two designs in
one process: ``released`` (what the engine loop does after ``--idle-release-seconds`` without
requests: ``heap.release_freed_memory``, timed, with the resident size before and after) and
``kept`` (the freed heap stays with the allocator, as before). Each round is one request of
exactly ``--tokens`` speech tokens (checked: the run stops with FIXED LENGTH NOT APPLIED
otherwise). Printed: per round and as medians, first-chunk and total seconds, the resident size,
the released/kept ratios, and the floors and load average of the same run.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_v1 import memory_kb  # noqa: E402
from bench_v2v3 import PROMPT_WAV, SAMPLES_PER_TOKEN, SEED, prompt_transcript  # noqa: E402
from floors import describe, footer, measure  # noqa: E402

from cosyvoice_lite.engine import Engine  # noqa: E402
from cosyvoice_lite.heap import release_freed_memory  # noqa: E402
from cosyvoice_lite.request import Mode, SynthesisRequest  # noqa: E402

TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"


def one_request(engine: Engine, tokens: int, stream: bool) -> tuple[float, float]:
    """(first chunk s, total s) of one request of exactly ``tokens`` speech tokens."""
    request = SynthesisRequest(
        Mode.ZERO_SHOT,
        TEXT,
        prompt_audio=PROMPT_WAV,
        prompt_text=prompt_transcript(),
        seed=SEED,
        stream=stream,
        max_speech_tokens=tokens,
        ignore_eos=True,
    )
    start = time.perf_counter()
    first, samples = None, 0
    for chunk in engine.synthesize(request):
        first = first if first is not None else time.perf_counter() - start
        samples += chunk.samples.size
    total = time.perf_counter() - start
    if samples != tokens * SAMPLES_PER_TOKEN * engine.sample_rate // 24000:
        raise SystemExit(f"FIXED LENGTH NOT APPLIED: {samples} samples for {tokens} tokens")
    return first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6, help="alternating, half of each design")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    engine = Engine.load(args.model, dtype=args.dtype, idle_release_seconds=None, download=False)
    one_request(engine, 30, stream=True)  # the voice's prompt frames, as for a saved voice
    results: dict[str, list[tuple[float, float]]] = {"released": [], "kept": []}
    print(
        f"{args.model.name} {args.dtype}, {args.tokens} tokens, "
        f"{'streaming' if args.stream else 'whole'}, {args.threads} threads"
    )
    print(
        f"{'round':<7}{'design':<10}{'RSS before':>11}{'after':>7}{'trim s':>8}{'first s':>9}{'total s':>9}"
    )
    for number in range(args.rounds):
        design = "released" if number % 2 == 0 else "kept"
        time.sleep(0.5)  # the last request's threads let go of it
        before = memory_kb()["rss_kb"] // 1024
        trim = 0.0
        if design == "released":
            start = time.perf_counter()
            release_freed_memory()
            trim = time.perf_counter() - start
        after = memory_kb()["rss_kb"] // 1024
        first, total = one_request(engine, args.tokens, args.stream)
        results[design].append((first, total))
        print(
            f"{number:<7}{design:<10}{before:>11}{after:>7}{trim:>8.3f}{first:>9.2f}{total:>9.2f}",
            flush=True,
        )
    engine.close()
    medians = {
        design: (statistics.median(f for f, _ in runs), statistics.median(t for _, t in runs))
        for design, runs in results.items()
    }
    for design, (first, total) in medians.items():
        print(f"median {design:<9} first chunk {first:.2f} s, total {total:.2f} s")
    (rf, rt), (kf, kt) = medians["released"], medians["kept"]
    print(f"released / kept: first chunk {rf / kf:.3f}x, total {rt / kt:.3f}x")
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
