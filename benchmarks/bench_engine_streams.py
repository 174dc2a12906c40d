"""Streams through the engine (LLM, flow and vocoder), one or several at once, against another
checkout's code, in one run; with ``--whole``, whole (non-streamed) requests instead.

One command: ``python benchmarks/bench_engine_streams.py --model DIR --baseline SRC
[--quantize int8] [--tokens 100] [--concurrency 1,4] [--rounds 3] [--whole]`` (a full-size
CosyVoice2/3 random-weight directory, ``tools/make_models.py --size full``; ``SRC``: the ``src``
directory of another checkout, e.g. a ``git worktree`` of the previous commit). Each round runs
one worker process per design, the order flipping each round, so both see the same host states.
A worker loads the engine, saves a voice (the 4.9 s test prompt, its prompt frames prepared),
waits for the flow's graphs, then for each concurrency ``c`` sends ``c`` requests of that voice
at once, each decoding exactly ``--tokens`` speech tokens (``max_speech_tokens`` +
``ignore_eos``; the run fails if a request's audio is not that long). Printed: per round and
level, the latest first audio among the ``c`` requests (a whole request's is its end) and the
time until all of them ended; then the medians, the ratios (baseline / ours), the load average
and the floors measured in the run. No HTTP: ``bench_serving.py`` measures the server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_stream_threads import level  # noqa: E402 - streams at once, their length checked
from bench_v1 import check_src, run_src_worker, src_env  # noqa: E402
from engine_requests import PROMPT, PROMPT_TEXT  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch

    import cosyvoice_lite
    from cosyvoice_lite import Engine

    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, quantize=args.quantize, share_onnx_threads=True)
    voice = engine.encode_prompt(PROMPT, PROMPT_TEXT)
    engine.prepare_voice(voice).result()
    engine.wait_until_warm(600)
    levels = {}
    for c in args.concurrency.split(","):
        first, wall = level(engine, voice, int(c), args.tokens, seed=0, stream=not args.whole)
        levels[c] = {"first_s": first, "wall_s": wall}
    engine.close()
    # the driver checks that the code it meant was imported
    print(json.dumps({"source": cosyvoice_lite.__file__, "levels": levels}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout's src")
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole", action="store_true", help="whole requests, not streamed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    check_src(args.baseline)
    import torch
    from floors import describe, footer, measure

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # each design's src first on the path: ours is this checkout's, not the installed package
    designs = {"ours": ROOT / "src", "baseline": args.baseline}
    runs: dict[str, list[dict]] = {name: [] for name in designs}
    for round_ in range(args.rounds):
        order = list(designs) if round_ % 2 == 0 else list(reversed(designs))
        for name in order:
            argv = [sys.executable, __file__, "--worker", "--model", str(args.model)]
            argv += ["--tokens", str(args.tokens), "--concurrency", args.concurrency]
            argv += ["--threads", str(args.threads), "--baseline", str(args.baseline)]
            argv += ["--quantize", args.quantize] if args.quantize else []
            argv += ["--whole"] if args.whole else []
            src = designs[name]
            levels = run_src_worker(name, argv, src_env(src, env), src)["levels"]
            runs[name].append(levels)
            for c, figures in levels.items():
                print(
                    f"round {round_ + 1} {name:<8} c={c}: latest first audio "
                    f"{figures['first_s']:.2f} s, all ended {figures['wall_s']:.2f} s",
                    flush=True,
                )
    precision = "float32" + (" + int8" if args.quantize else "")
    requests = "whole request" if args.whole else "stream"
    print(
        f"\n{args.model.name}, {precision}, {args.tokens} tokens per {requests}, a saved 4.9 s "
        f"voice, {args.threads} threads; medians of {args.rounds} rounds"
    )
    print(f"{'c':>3}{'first audio s, ours / base':>30}{'ratio':>8}{'all ended s':>22}{'ratio':>8}")
    for c in runs["ours"][0]:

        def median(name: str, key: str, c: str = c) -> float:
            return statistics.median(levels[c][key] for levels in runs[name])

        first = median("ours", "first_s"), median("baseline", "first_s")
        wall = median("ours", "wall_s"), median("baseline", "wall_s")
        print(
            f"{c:>3}{first[0]:>16.2f} / {first[1]:<11.2f}{first[1] / first[0]:>7.2f}x"
            f"{wall[0]:>10.2f} / {wall[1]:<9.2f}{wall[1] / wall[0]:>7.2f}x"
        )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
