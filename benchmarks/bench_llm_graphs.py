"""The LLM's decoding steps as captured graphs vs eager, in one process (issue 9, item 2).

One command: ``python benchmarks/bench_llm_graphs.py --model DIR [--dtype float32] [--rounds 6]``
for a full-size directory of any version (CosyVoice-300M, CosyVoice2, CosyVoice3). It loads the
engine as the server does (graphs captured on a CPU), then, on a thread set up as the engine's
decoding loop (``Engine.loop.decode_threads`` torch threads of its own, the process's count for
the products), times the median decoding step of one row and of two rows of different lengths
after a prefill, with the step graphs on and off in turn (the order alternating each round), so
that the host's drift, which moves separate processes here by more than the change, falls on
both alike. Each round checks that both ways computed the same log-probabilities (within
``TOLERANCE``; the largest difference is printed), and the run fails loudly if the LLM has no
graphs to switch. Prints the medians over rounds,
eager / captured, each against the weight-read floor (bytes of weights a step reads over the
memory bandwidth measured in the same run), and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_requests import measured_engine  # noqa: E402
from floors import describe, footer  # noqa: E402
from precision_bench import llm_bytes_per_token  # noqa: E402

from cosyvoice_lite.networks.graph_capture import CapturedGraphs  # noqa: E402
from cosyvoice_lite.row_parallel import start_torch_thread  # noqa: E402

ARMS = ("captured", "eager")
# A graph runs every operation on the products' threads, eager ones on the loop thread's one:
# torch's fused attention splits a lone query's keys between threads, which moves CosyVoice-300M's
# log-probabilities by ~1e-6 (CosyVoice2's grouped queries: none)
TOLERANCE = 1e-5


def step_owner(llm: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``graphs`` run the LLM's decoding steps."""
    owners = [m for m in llm.modules() if isinstance(getattr(m, "graphs", None), CapturedGraphs)]
    if len(owners) != 1:
        raise SystemExit(
            "NO STEP GRAPHS: the LLM was not captured (an int8 LLM on onnxruntime, a GPU, "
            "or capture turned off), so there is nothing to compare"
        )
    return owners[0]


def print_step_table(
    results: dict[tuple[str, int], list[float]],
    arms: tuple[str, str],
    row_counts: tuple[int, ...] | list[int],
    floor_ms: float,
) -> None:
    """The median step of each arm and row count (seconds per round in ``results``), each
    against the weight-read floor, and the second arm's over the first's."""
    first, second = arms
    print(f"| rows | {first} ms (x floor) | {second} ms (x floor) | {second} / {first} |")
    print("|---|---|---|---|")
    for rows in row_counts:
        a, b = (1e3 * statistics.median(results[arm, rows]) for arm in arms)
        print(
            f"| {rows} | {a:.1f} ({a / floor_ms:.2f}x) | "
            f"{b:.1f} ({b / floor_ms:.2f}x) | {b / a:.2f}x |"
        )


def timed_steps(
    llm: torch.nn.Module, rows: int, prefill: int, steps: int, seed: int
) -> tuple[float, torch.Tensor]:
    """Median seconds of ``steps`` decoding steps of ``rows`` rows (prefills of ``prefill``,
    ``prefill`` + 7, ... positions) and the last step's log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    like = llm.speech_input(0)  # a fed-back token's input: the width and dtype of every input
    width, dtype = like.size(-1), like.dtype
    caches = [llm.new_cache() for _ in range(rows)]
    for row, cache in enumerate(caches):
        x = (torch.randn(1, prefill + 7 * row, width, generator=g) * 0.02).to(dtype)
        llm.log_probs(x, [cache])
    times = []
    for _ in range(steps):
        tokens = torch.randint(0, 4096, (rows,), generator=g).tolist()
        x = torch.cat([llm.speech_input(t) for t in tokens])
        start = time.perf_counter()
        out = llm.log_probs(x, caches)
        out[0, 0].item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]), out


def alternating_steps(
    engine: Any,
    llm: torch.nn.Module,
    arms: dict[str, Callable[[], None]],
    row_counts: tuple[int, ...] | list[int],
    args: argparse.Namespace,
    check: Callable[[dict[tuple[str, int], torch.Tensor]], None],
) -> dict[tuple[str, int], list[float]]:
    """On a thread set up as the engine's decoding loop, ``args.rounds`` rounds: every arm in
    turn (its switch called first, the order flipping each round) times the median step of each
    row count (``timed_steps``), then ``check`` compares the arms' last log-probabilities of the
    round. Returns each (arm, rows)'s median step per round; a failure on that thread is raised
    here."""
    results: dict[tuple[str, int], list[float]] = {(a, r): [] for a in arms for r in row_counts}
    failure: list[BaseException] = []
    names = list(arms)

    def work() -> None:
        try:
            with torch.inference_mode():
                for round_ in range(args.rounds):
                    outs = {}
                    for arm in names if round_ % 2 == 0 else names[::-1]:
                        arms[arm]()
                        for rows in row_counts:
                            seconds, outs[arm, rows] = timed_steps(
                                llm, rows, args.prefill, args.steps, seed=round_
                            )
                            results[arm, rows].append(seconds)
                    check(outs)
                    print(
                        f"round {round_ + 1}: "
                        + ", ".join(
                            f"{arm} {rows} row{'s' * (rows > 1)} "
                            f"{1e3 * results[arm, rows][-1]:.1f} ms"
                            for arm in names
                            for rows in row_counts
                        ),
                        flush=True,
                    )
        except BaseException as exc:  # noqa: BLE001 - reported from the main thread
            failure.append(exc)

    start_torch_thread(work, engine.loop.decode_threads, "decode", args.threads).join()
    if failure:
        raise failure[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a full-size model directory")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prefill", type=int, default=200)
    args = parser.parse_args()
    with measured_engine(args.model, args.threads, dtype=args.dtype) as (
        engine,
        floors,
        load_start,
    ):
        llm = engine.pipeline.llm
        owner = step_owner(llm)
        graphs = owner.graphs
        floor_ms = 1e3 * llm_bytes_per_token(llm) / (floors["memory_bandwidth_gbs"] * 1e9)
        differences: list[float] = []

        def check(outs: dict[tuple[str, int], torch.Tensor]) -> None:
            for rows in (1, 2):
                diff = float((outs["captured", rows] - outs["eager", rows]).abs().max())
                differences.append(diff)
                if diff > TOLERANCE:
                    raise SystemExit(f"captured and eager differ by {diff:.3g}")

        def arm(captured: bool) -> Callable[[], None]:
            return lambda: setattr(owner, "graphs", graphs if captured else None)

        try:
            arms = {"captured": arm(True), "eager": arm(False)}
            results = alternating_steps(engine, llm, arms, (1, 2), args, check)
        finally:
            owner.graphs = graphs
        if len(graphs) < 2:
            raise SystemExit(f"STEP GRAPHS DID NOT RUN: {len(graphs)} traced")
    print(
        f"\n{args.model.name} {args.dtype}, {args.threads} threads, median step over "
        f"{args.rounds} rounds (each the median of {args.steps - 3} steps after a "
        f"{args.prefill}-position prefill); weight-read floor {floor_ms:.1f} ms; "
        f"log-probabilities captured vs eager within {max(differences):.2g}"
    )
    print_step_table(results, ARMS, (1, 2), floor_ms)
    print(footer(describe(floors), load_start))


if __name__ == "__main__":
    main()
