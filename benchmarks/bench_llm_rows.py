"""A float32 LLM's batched decoding steps: plain weights (the transposed product for 2-16 rows)
vs the packed layout of one row, in one process (issue 8: what a step of B rows costs).

One command: ``python benchmarks/bench_llm_rows.py --model DIR [--rows 1,2,4,8] [--rounds 4]``
for a full-size directory of any version. It loads the engine as the server does (float32;
``precision.float32_layouts`` says whether this CPU keeps plain weights by default), then,
on a thread set up as the engine's decoding loop, times the median decoding step of each row
count (rows prefilled with 150, 157, ... positions), with every packed layer of the LLM switched
in place between the two forms in turn (the order alternating each round; the step graphs traced
again after each switch, as they hold the weights they were traced with). Each round checks that
both forms computed the same log-probabilities bit for bit; the run fails loudly if the LLM has no
packed layers. Prints the medians over rounds with the ratio, each against the weight-read floor
(bytes of weights a step reads over the memory bandwidth measured in the same run), and the
machine's load average.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_llm_graphs import alternating_steps, print_step_table  # noqa: E402
from engine_requests import measured_engine  # noqa: E402
from floors import describe, footer  # noqa: E402
from precision_bench import llm_bytes_per_token  # noqa: E402

from cosyvoice_lite.networks.graph_capture import CapturedGraphs  # noqa: E402
from cosyvoice_lite.precision import PackedLinear  # noqa: E402

FORMS = ("plain", "packed")


def switch(llm: torch.nn.Module, layers: list[PackedLinear], form: str) -> None:
    """Every packed layer in ``form`` (the same numbers), then the step graphs traced anew."""
    for layer in layers:
        layer.relayout(None if form == "plain" else 1)
    owners = [m for m in llm.modules() if isinstance(getattr(m, "graphs", None), CapturedGraphs)]
    if owners:
        llm.capture_graphs(owners[0].step_threads)
        llm.warm_graphs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a full-size model directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--prefill", type=int, default=150)
    args = parser.parse_args()
    row_counts = [int(r) for r in args.rows.split(",")]
    with measured_engine(args.model, args.threads, dtype="float32") as (engine, floors, load_start):
        llm = engine.pipeline.llm
        layers = [m for m in llm.modules() if isinstance(m, PackedLinear)]
        if not layers:
            raise SystemExit("NO PACKED LAYERS: nothing to switch (exact float32, or no oneDNN)")
        default = "plain" if layers[0].transposed_rows else "packed"
        floor_ms = 1e3 * llm_bytes_per_token(llm) / (floors["memory_bandwidth_gbs"] * 1e9)

        def check(outs: dict[tuple[str, int], torch.Tensor]) -> None:
            for rows in row_counts:
                if not torch.equal(outs["plain", rows], outs["packed", rows]):
                    raise SystemExit(f"the two forms differ at {rows} rows")

        arms = {form: partial(switch, llm, layers, form) for form in FORMS}
        results = alternating_steps(engine, llm, arms, row_counts, args, check)
    print(
        f"\n{args.model.name} float32, {args.threads} threads, median step over {args.rounds} "
        f"rounds (each the median of {args.steps - 3} steps); this CPU's default: {default}; "
        f"weight-read floor {floor_ms:.1f} ms; log-probabilities of both forms bit-identical"
    )
    print_step_table(results, FORMS, row_counts, floor_ms)
    print(footer(describe(floors), load_start))


if __name__ == "__main__":
    main()
