"""Memory and speed of one long CosyVoice2/3 stream under per-stream flow cache budgets.

One command: ``python benchmarks/bench_stream_memory.py --model DIR [--tokens 750]
[--budgets none,1024,256] [--cache-dtypes float32,float16] [--dtype float32]``. Each budget
(for each ``--stream-cache-dtype`` named) runs in its own process (peak RSS is
per process): the engine loads, a saved voice's prompt goes through the flow once (the per-voice
cache, shared by every stream of that voice, reported apart), then one stream of ``--tokens``
replayed speech tokens (fixed: no LLM work, exact length, checked) runs through the flow and
vocoder with the official chunk schedule. Printed per budget: peak RSS above the loaded model and
the voice cache, that cache, time, real-time factor, first-chunk compute time; the machine's
load average and floors come from the same run. ``--baseline SRC`` (the ``src`` directory of
another checkout, e.g. a ``git worktree`` of the previous commit) runs each configuration with
that code too, alternated with ours ``--rounds`` times (medians), so a change is compared in one
host state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_TOKEN = 2 * 480
MEDIANS = ("loaded_kb", "voice_cache_kb", "prime_s", "peak_kb", "stream_peak_kb", "seconds")
MEDIANS += ("first_chunk_compute_s",)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_v1 import memory_kb, release_free_memory, reset_peak_memory
    from bench_v2v3 import PROMPT_WAV, prompt_transcript

    import cosyvoice_lite
    from cosyvoice_lite.engine import Engine
    from cosyvoice_lite.request import Mode, SynthesisRequest

    budget = None if args.budget == "none" else int(args.budget)
    cache_dtype = None if args.cache_dtype == "default" else args.cache_dtype
    engine = Engine.load(
        args.model,
        dtype=args.dtype,
        stream_cache_mb=budget,
        stream_cache_dtype=cache_dtype,
        download=False,
    )
    loaded = memory_kb()["rss_kb"]
    voice = engine.encode_prompt(PROMPT_WAV, prompt_transcript())
    request = SynthesisRequest(Mode.ZERO_SHOT, "你好", stream=True)
    prompt = engine._prompt(request, voice)
    inputs = engine._inputs(request, engine._segments(request)[0], prompt)
    pipeline = engine.pipeline
    start = time.perf_counter()
    pipeline.prompt_flows.stream(pipeline.flow, inputs)  # the saved voice's prompt, once
    prime_s = time.perf_counter() - start
    release_free_memory()
    with_voice = memory_kb()["rss_kb"]
    if not reset_peak_memory():
        raise SystemExit("cannot reset the peak RSS here (/proc/self/clear_refs)")
    rng = random.Random(1986)
    tokens = [rng.randrange(6561) for _ in range(args.tokens)]
    generator = torch.Generator().manual_seed(1986)
    segment = pipeline.start(inputs, generator, stream=True)
    samples, first, chunks = 0, None, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for token in tokens:
            piece = segment.push(token)
            if piece is not None:
                samples += piece.numel()
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
        samples += segment.finish().numel()
    seconds = time.perf_counter() - start
    if samples != args.tokens * SAMPLES_PER_TOKEN * engine.sample_rate // 24000:
        raise SystemExit(f"FIXED LENGTH NOT APPLIED: {samples} samples for {args.tokens} tokens")
    peak = memory_kb()["hwm_kb"]
    audio = samples / engine.sample_rate
    print(
        json.dumps(
            {
                "source": cosyvoice_lite.__file__,  # the driver checks it is the code it meant
                "budget_mb": budget,
                "cache_dtype": args.cache_dtype,
                "loaded_kb": loaded,
                "voice_cache_kb": with_voice - loaded,
                "prime_s": prime_s,
                "peak_kb": peak,
                "stream_peak_kb": peak - with_voice,
                "seconds": seconds,
                "audio_s": audio,
                "first_chunk_compute_s": first,
                "chunks": chunks + 1,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=750, help="speech tokens (25 per second)")
    parser.add_argument("--budgets", default="none,1024,256", help="MiB per stream, or none")
    parser.add_argument(
        "--cache-dtypes", default="default", help="stream cache dtypes (float16, float32, default)"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="the src directory of another checkout")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each design, alternated")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dtype", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_v1 import check_src, run_src_worker, src_env

    if args.baseline is not None:
        check_src(args.baseline)
    import torch
    from floors import describe, footer, measure

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # each design's src first on the path: ours is this checkout's, not the installed package
    designs = {"ours": ROOT / "src"}
    if args.baseline is not None:
        designs["baseline"] = args.baseline
    rows = []
    for cache_dtype in args.cache_dtypes.split(","):
        for budget in args.budgets.split(","):
            runs: dict[str, list[dict]] = {name: [] for name in designs}
            for _ in range(args.rounds):
                for name, src in designs.items():
                    argv = [sys.executable, __file__, "--worker", "--budget", budget]
                    argv += ["--cache-dtype", cache_dtype]
                    argv += ["--model", str(args.model), "--tokens", str(args.tokens)]
                    argv += ["--dtype", args.dtype, "--threads", str(args.threads)]
                    runs[name].append(run_src_worker(name, argv, src_env(src, env), src))
                    print(f"{name}: {cache_dtype} caches, budget {budget}: {runs[name][-1]}")
            for name, samples in runs.items():
                row = {**samples[0], "design": name}
                for key in MEDIANS:
                    row[key] = statistics.median(sample[key] for sample in samples)
                rows.append(row)
    mib = 1 / 1024
    print(
        f"\none stream of {args.tokens} replayed tokens ({rows[0]['audio_s']:.1f} s of audio), "
        f"{args.model.name}, {args.dtype}, {args.threads} threads; model RSS "
        f"{rows[0]['loaded_kb'] * mib:.0f} MiB; the saved voice's prompt flow cache computed once "
        f"in {rows[0]['prime_s']:.1f} s; medians of {args.rounds} round(s)"
    )
    print(
        f"{'caches, budget':<32}{'voice MiB':>10}{'stream peak MiB':>16}{'time s':>9}{'RTF':>7}"
        f"{'first chunk s':>15}{'time vs first row':>19}"
    )
    for row in rows:
        budget = "unbounded" if row["budget_mb"] is None else f"{row['budget_mb']} MiB"
        label = f"{row['cache_dtype']}, {budget}"
        label += f" ({row['design']})" if len(designs) > 1 else ""
        print(
            f"{label:<32}{row['voice_cache_kb'] * mib:>10.0f}"
            f"{row['stream_peak_kb'] * mib:>16.0f}{row['seconds']:>9.1f}"
            f"{row['seconds'] / row['audio_s']:>7.2f}{row['first_chunk_compute_s']:>15.2f}"
            f"{row['seconds'] / rows[0]['seconds']:>18.2f}x"
        )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
