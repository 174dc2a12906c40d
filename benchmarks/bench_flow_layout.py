"""A float32 flow's linear weights laid out for many rows vs for one row, in one process.

One command: ``python benchmarks/bench_flow_layout.py --model DIR [--tokens 100] [--rounds 4]``
for a full-size CosyVoice2 or CosyVoice3 directory. It loads the engine as the server does
(float32; ``precision.float32_layouts`` says which layout this CPU gets by default), then times
two flow calls with every packed layer of the flow switched in place between oneDNN's layout for
``MANY_ROWS`` rows and its layout for one row, in turn (the order alternating each round; the
estimator's graphs traced again after each switch, as they hold the weights they were traced
with, and each call run once untimed first): a whole utterance of ``--tokens`` tokens after a
123-token prompt (its CFG rows: two of prompt + new frames), and one streamed chunk of a primed
voice (50 new frames). Each round checks that both layouts computed the same mel (within
``TOLERANCE``; the largest difference is printed).
Prints the medians over rounds with the ratio, the machine's load average and its floors
(memory bandwidth, matmul throughput) measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_flow_batch import primed_voice, random_voice  # noqa: E402
from engine_requests import measured_engine  # noqa: E402
from floors import describe, footer  # noqa: E402

from cosyvoice_lite.precision import MANY_ROWS, PackedLinear  # noqa: E402

LAYOUTS = {"many rows": MANY_ROWS, "one row": 1}
# Products of many rows compute the same floats in either layout; one row (the speaker
# embedding's projection) differs by float32 rounding, as oneDNN's one-row product reads only
# the one-row layout as a matrix-vector product
TOLERANCE = 1e-4


def switch(flow: torch.nn.Module, layers: list[PackedLinear], rows: int) -> None:
    """Every packed layer laid out for ``rows`` rows (the same numbers), graphs traced anew."""
    for layer in layers:
        layer.relayout(rows)
    estimator = flow.decoder.estimator
    if getattr(estimator, "graphs", None) is not None:
        estimator.capture_graphs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with measured_engine(args.model, args.threads, dtype="float32") as (engine, floors, load_start):
        flow = engine.pipeline.flow
        # (not the layers whose weights the fixed schedule released: fix_schedule)
        layers = [m for m in flow.modules() if isinstance(m, PackedLinear) and m.weight.dim() == 2]
        if not layers or layers[0].transposed_rows:
            raise SystemExit("NO PACKED FLOW LAYERS: nothing to switch (exact float32?)")
        g = torch.Generator().manual_seed(0)
        prompt_token, prompt_feat, embedding = random_voice(flow, g)
        vocab = flow.input_embedding.num_embeddings
        token = torch.randint(0, vocab, (1, args.tokens), generator=g)
        voice, hop = primed_voice(flow)

        def whole() -> torch.Tensor:
            lengths = torch.tensor([args.tokens]), torch.tensor([prompt_token.size(1)])
            mel, _ = flow.inference(
                token, lengths[0], prompt_token, lengths[1], prompt_feat,
                torch.tensor([prompt_feat.size(1)]), embedding, streaming=False, finalize=True,
            )  # fmt: skip
            return mel

        def chunk() -> torch.Tensor:
            mel = flow.stream_step(voice.fork(), hop)
            if mel.size(2) == 0:
                raise SystemExit("FIXED CHUNK NOT COMPUTED: the hop did not complete a chunk")
            return mel

        calls = {"whole utterance": whole, "streamed chunk": chunk}
        results = {(layout, call): [] for layout in LAYOUTS for call in calls}
        differences: list[float] = []
        with torch.inference_mode():
            for round_ in range(args.rounds):
                mels = {}
                for layout in list(LAYOUTS) if round_ % 2 == 0 else list(LAYOUTS)[::-1]:
                    switch(flow, layers, LAYOUTS[layout])
                    for call, fn in calls.items():
                        fn()  # traces the graph after the switch
                        start = time.perf_counter()
                        mels[layout, call] = fn()
                        results[layout, call].append(time.perf_counter() - start)
                for call in calls:
                    diff = float((mels["many rows", call] - mels["one row", call]).abs().max())
                    differences.append(diff)
                    if diff > TOLERANCE:
                        raise SystemExit(f"the two layouts differ by {diff:.3g} ({call})")
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(
                        f"{layout} {call} {results[layout, call][-1]:.2f} s"
                        for layout in LAYOUTS
                        for call in calls
                    ),
                    flush=True,
                )
    print(
        f"\n{args.model.name} float32, {args.threads} threads, median over {args.rounds} rounds; "
        f"whole: {args.tokens} tokens after a {prompt_token.size(1)}-token prompt; "
        f"mel of the two layouts within {max(differences):.2g}"
    )
    print(f"| call | laid out for {MANY_ROWS} rows | for one row | ratio |")
    print("|---|---|---|---|")
    for call in calls:
        many = statistics.median(results["many rows", call])
        one = statistics.median(results["one row", call])
        print(f"| {call} | {many:.2f} s | {one:.2f} s | {one / many:.2f}x |")
    print(footer(describe(floors), load_start))


if __name__ == "__main__":
    main()
