"""Whole requests through the engine with the flow estimator's calls as traced graphs (the default
on a CPU since 2026-12-06) against the eager estimator, in one run.

One command: ``python benchmarks/bench_graph_capture.py --model DIR [--dtype bfloat16]
[--concurrency 1,4] [--rounds 3] [--tokens 100] [--stream]`` (a full-size CosyVoice-300M-SFT,
CosyVoice2 or CosyVoice3 random-weight directory, ``tools/make_models.py --size full``). Two engines are loaded in this
process, ``capture_graphs=True`` and ``False``, and each warms up with one request (which traces
the graph). Then ``c`` whole (not streamed) requests at once for each concurrency, ``--rounds``
times, the two engines alternating (the order flipping each round). Each request decodes exactly
``--tokens`` speech tokens (``max_speech_tokens`` + ``ignore_eos``; the run fails if a request's
audio is not that long), with a preset voice where the model has one, else the saved test prompt.
Printed: per round and level, aggregate audio seconds per wall second and the latest first audio;
then the medians, the ratios, the load average and the floors measured in the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_requests import PROMPT, PROMPT_TEXT, at_once  # noqa: E402
from floors import describe, footer, measure  # noqa: E402


def level(
    engine, voice, requests: int, tokens: int, seed: int, stream: bool = False
) -> tuple[float, float]:
    """``requests`` requests at once: (audio seconds per wall second, the latest first audio in
    seconds)."""
    timings, wall = at_once(engine, voice, requests, tokens, seed, stream)
    return sum(audio for _, audio in timings) / wall, max(first for first, _ in timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v1 or v2 directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument(
        "--stream", action="store_true", help="streams of the saved voice, not whole requests"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from cosyvoice_lite.engine import Engine

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    engines = {
        name: Engine.load(
            args.model,
            dtype=args.dtype,
            quantize=args.quantize,
            capture_graphs=capture,
            share_onnx_threads=True,  # as the CLI and the server load
        )
        for name, capture in (("captured", True), ("eager", False))
    }
    voices = {}
    for name, engine in engines.items():
        presets = [v for v in engine.voices() if engine.presets[v].kind == "preset"]
        if presets and not args.stream:
            voices[name] = presets[0]
        else:
            voices[name] = engine.encode_prompt(PROMPT, PROMPT_TEXT)
            engine.prepare_voice(voices[name]).result()
        for requests in (1, 2):  # warm-up: traces the captured graphs of one and two rows
            level(engine, voices[name], requests, args.tokens, 99, args.stream)
    estimator = engines["captured"].pipeline.flow.decoder.estimator
    if not getattr(estimator, "graphs", None):
        raise SystemExit("NO GRAPH CAPTURED: this model's estimator is not captured")
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for requests in levels:
            order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]
            for name in order:
                rate, first = level(
                    engines[name], voices[name], requests, args.tokens, round_, args.stream
                )
                results.setdefault((name, requests), []).append((rate, first))
                print(
                    f"round {round_ + 1}, c={requests}, {name}: {rate:.3f} audio s/s, "
                    f"latest first audio {first:.2f} s",
                    flush=True,
                )
    for engine in engines.values():
        engine.close()
    kind = "stream" if args.stream else "whole request"
    print(
        f"\n{args.model.name} {args.dtype}{', ' + args.quantize if args.quantize else ''}, "
        f"{args.threads} threads, {args.tokens} tokens per {kind}, median of {args.rounds} rounds:"
    )
    for requests in levels:
        med = {
            name: [statistics.median(r[i] for r in results[(name, requests)]) for i in range(2)]
            for name in engines
        }
        (cap_rate, cap_first), (eager_rate, eager_first) = med["captured"], med["eager"]
        print(
            f"  c={requests}: captured {cap_rate:.3f} audio s/s, eager {eager_rate:.3f} "
            f"({cap_rate / eager_rate:.2f}x); latest first audio captured {cap_first:.2f} s, "
            f"eager {eager_first:.2f} s ({eager_first / cap_first:.2f}x sooner)"
        )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
