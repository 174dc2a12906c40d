"""onnxruntime's threads for the int8 LLM: a pool per session (onnxruntime's default) vs one pool
shared by the process (``Engine.load(share_onnx_threads=True)``, what the CLI and the server use).

One command: ``python benchmarks/bench_onnx_pool.py --model DIR [--dtype bfloat16] [--tokens 50]
[--concurrency 1,4] [--stream] [--rounds 2]``. The pool is a property of the process, so each
design runs in a worker process of its own, in turn, ``--rounds`` times. A worker loads the engine
with ``--quantize int8`` from a full-size directory, times the median LLM decoding step (20 steps
after a 200-position prefill), then runs ``--concurrency`` requests at once (a preset voice, or a
saved prompt voice on a model without presets) of exactly ``--tokens`` speech tokens (stopping
turned off; a worker fails loudly when a request's audio has another length). Figures are
medians over rounds; ratios are shared / own (above 1: the shared pool is faster). Prints the
machine's load average and floors from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ("own pools", "shared pool")
PREFILL = 200
STEPS = 20
TEXT = "今天天气很好，我们一起去公园散步吧。"
PROMPT = (ROOT / "tests/data/audio/zh_16k.wav", "希望你以后能够做的比我还好呦。")


def decoding_step_ms(llm, dtype) -> float:  # noqa: ANN001 - the engine's LLM network
    import torch

    g = torch.Generator().manual_seed(1)
    width = llm.llm_decoder.in_features
    with torch.inference_mode():
        cache = llm.new_cache()
        llm.log_probs(torch.randn(1, PREFILL, width, generator=g).to(dtype), [cache])
        steps = []
        for _ in range(STEPS + 3):
            x = torch.randn(1, 1, width, generator=g).to(dtype)
            start = time.perf_counter()
            llm.log_probs(x, [cache])
            steps.append(time.perf_counter() - start)
    return 1e3 * statistics.median(steps[3:])


def worker(args: argparse.Namespace) -> None:
    import torch
    from engine_requests import at_once

    from cosyvoice_lite import Engine
    from cosyvoice_lite.onnx_threads import shared_threads

    torch.set_num_threads(args.threads)
    shared = args.design == "shared pool"
    engine = Engine.load(
        args.model, dtype=args.dtype, quantize="int8", download=False, share_onnx_threads=shared
    )
    if (shared_threads() is not None) != shared:
        raise SystemExit(f"{args.design}: the pool is not what was asked (this CPU's int8 flow?)")
    if engine.graphs_traced is not None:
        engine.graphs_traced.result()  # the flow's traces, off the clock
    pipeline = engine.pipeline
    step_ms = decoding_step_ms(pipeline.llm, pipeline.llm.speech_embedding.weight.dtype)
    presets = list(engine.voices())
    voice = presets[0] if presets else engine.encode_prompt(*PROMPT)
    if not presets:
        engine.prepare_voice(voice).result()
    at_once(engine, voice, 1, args.tokens, 99, args.stream, TEXT)  # warm-up
    levels = {}
    for level in (int(c) for c in args.concurrency.split(",")):
        timings, wall = at_once(engine, voice, level, args.tokens, 0, args.stream, TEXT)
        audio = sum(seconds for _, seconds in timings)
        levels[level] = {"audio_per_s": audio / wall, "first_max": max(f for f, _ in timings)}
    engine.close()
    print(json.dumps({"step_ms": step_ms, "levels": levels}))


def run_worker(args: argparse.Namespace, design: str) -> dict:
    from bench_v1 import worker_env

    argv = [sys.executable, __file__, "--worker", design, "--model", str(args.model)]
    argv += ["--dtype", args.dtype, "--threads", str(args.threads), "--tokens", str(args.tokens)]
    argv += ["--concurrency", args.concurrency] + (["--stream"] if args.stream else [])
    env = worker_env(args.threads, "passive")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{design} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size model directory")
    parser.add_argument("--dtype", default="bfloat16", help="the flow's and vocoder's dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens per request")
    parser.add_argument("--concurrency", default="1,4", help="requests at once, per measurement")
    parser.add_argument("--stream", action="store_true", help="streamed requests")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=DESIGNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.design = args.worker
        return worker(args)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floors import describe, footer, measure

    load_start = os.getloadavg()
    floors = describe(measure())
    results: dict[str, list[dict]] = {d: [] for d in DESIGNS}
    for _ in range(args.rounds):
        for design in DESIGNS:
            results[design].append(run_worker(args, design))
    how = "streams" if args.stream else "whole requests"
    print(f"{args.model.name}, int8 LLM + {args.dtype}, {args.threads} threads")
    print(f"{args.tokens}-token {how}; medians of {args.rounds} rounds; ratio: shared / own")

    def median(design: str, pick) -> float:  # noqa: ANN001
        return statistics.median(pick(r) for r in results[design])

    print(f"{'':>28}{'own pools':>12}{'shared pool':>12}{'ratio':>9}")
    own, shared = (median(d, lambda r: r["step_ms"]) for d in DESIGNS)
    print(f"{'LLM decoding step ms':>28}{own:>12.1f}{shared:>12.1f}{own / shared:>8.2f}x")
    for level in args.concurrency.split(","):
        for key, label, faster in (
            ("audio_per_s", f"c={level} audio s per s", lambda a, b: b / a),
            ("first_max", f"c={level} latest first audio s", lambda a, b: a / b),
        ):
            own, shared = (median(d, lambda r, k=key, c=level: r["levels"][c][k]) for d in DESIGNS)
            print(f"{label:>28}{own:>12.3f}{shared:>12.3f}{faster(own, shared):>8.2f}x")
    print(f"\n{footer(floors, load_start)}")


if __name__ == "__main__":
    main()
