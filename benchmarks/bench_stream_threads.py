"""Streams through the engine with a stream's flow calls narrowed while the LLM decodes (the
default since 2026-12-05 afternoon) against every flow call on all the row threads, in one run.

One command: ``python benchmarks/bench_stream_threads.py --model DIR [--dtype bfloat16]
[--concurrency 1,2,4] [--rounds 4] [--tokens 50]`` (a full-size CosyVoice2/3 random-weight
directory, ``tools/make_models.py --size full``). Two engines are loaded in this process: the
default one, whose audio workers compute a flow call of fewer than two rows per row thread (one
stream's CFG pair) on half the row threads while the loop decodes (``row_parallel.at_most``), and
one loaded with ``flow_threads_while_decoding`` = all threads (the design before). A saved voice
(the 4.9 s test prompt, its prompt frames prepared in both) then streams ``c`` requests at once
for each concurrency, ``--rounds`` times, the two engines alternating (the order flipping each
round). Each request decodes exactly ``--tokens`` speech tokens (``max_speech_tokens`` +
``ignore_eos``; the run fails if a stream's audio is not that long). Printed: per round and
level, the latest first audio among the ``c`` streams and the wall time of the level; then the
medians, the ratios, the load average and the floors measured in the run. Engine level (no
HTTP): ``bench_serving.py --designs loop,loop-wide`` is the same comparison through the server,
one sample per level.
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
    engine, prompt, streams: int, tokens: int, seed: int, stream: bool = True
) -> tuple[float, float]:
    """``streams`` requests at once, streamed (or whole, ``stream=False``): (the latest first
    audio, the wall time), in seconds."""
    timings, wall = at_once(engine, prompt, streams, tokens, seed, stream)
    return max(first for first, _ in timings), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from cosyvoice_lite.engine import Engine

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    engines = {
        "narrowed": Engine.load(args.model, dtype=args.dtype),
        "wide": Engine.load(args.model, dtype=args.dtype, flow_threads_while_decoding=args.threads),
    }
    prompts = {}
    for name, engine in engines.items():
        prompts[name] = engine.encode_prompt(PROMPT, PROMPT_TEXT)
        engine.prepare_voice(prompts[name]).result()
        level(engine, prompts[name], 1, args.tokens, 99)  # warm-up
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for streams in levels:
            order = list(engines) if round_ % 2 == 0 else list(engines)[::-1]
            for name in order:
                first, wall = level(engines[name], prompts[name], streams, args.tokens, round_)
                results.setdefault((name, streams), []).append((first, wall))
                print(
                    f"round {round_ + 1}, c={streams}, {name}: latest first audio {first:.2f} s, "
                    f"wall {wall:.2f} s",
                    flush=True,
                )
    for engine in engines.values():
        engine.close()
    print(
        f"\n{args.model.name} {args.dtype}, {args.threads} threads, {args.tokens} tokens per "
        f"stream, median of {args.rounds} rounds:"
    )
    for streams in levels:
        med = {
            name: [statistics.median(r[i] for r in results[(name, streams)]) for i in range(2)]
            for name in engines
        }
        print(
            f"  c={streams}: latest first audio narrowed {med['narrowed'][0]:.2f} s, wide "
            f"{med['wide'][0]:.2f} s ({med['wide'][0] / med['narrowed'][0]:.2f}x); wall narrowed "
            f"{med['narrowed'][1]:.2f} s, wide {med['wide'][1]:.2f} s "
            f"({med['wide'][1] / med['narrowed'][1]:.2f}x)"
        )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
