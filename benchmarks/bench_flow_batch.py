"""Streams' flow chunks computed together vs one by one (CosyVoice2/3, the engine's audio stage).

One command: ``python benchmarks/bench_flow_batch.py --model DIR [--streams 1,2,4,8]
[--dtype float32] [--quantize int8] [--threads 2] [--repeats 3]``. A voice's prompt goes through
the streaming flow once (as for a saved voice); then, for each count S, S streams forked from it
each receive one hop of tokens (one whole chunk: 50 new mel frames) and the chunks are computed
three ways in the same run, in turn: one `stream_step` per stream, one `stream_steps` call for
all S with the estimator's rows each computed alone on the threads (the design before
2026-12-05 noon), and the same call with one share of the rows per thread (the engine's way
past ``exact_float32``; with one thread both are one batch). Printed per S: the best time of each,
the speed-ups of the shares over the other two, the time per stream, and the largest difference
between a stream's mel in either batch and alone (0.0: bit-identical); then the machine's load
average and floors (memory bandwidth, fp32/bf16 matmul) measured in the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from floors import describe, footer, measure  # noqa: E402

from cosyvoice_lite.engine import Engine  # noqa: E402
from cosyvoice_lite.row_parallel import RowSplit  # noqa: E402

PROMPT_TOKENS = 123  # a 4.9 s prompt, as in bench_v2v3.py


def random_voice(flow: Any, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random 123-token voice of a CosyVoice2/3 flow: prompt tokens [1, P], prompt mel
    [1, 2P, 80], speaker embedding [1, 192]."""
    if not hasattr(flow, "stream_tokens_needed"):
        raise SystemExit("this benchmark needs a CosyVoice2/3 model directory")
    vocab = flow.input_embedding.num_embeddings
    prompt_token = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=g)
    prompt_feat = torch.randn(1, 2 * PROMPT_TOKENS, 80, generator=g)
    return prompt_token, prompt_feat, torch.randn(1, 192, generator=g)


def primed_voice(flow: Any) -> tuple[Any, torch.Tensor]:
    """A stream of a random 123-token voice whose prompt went through the flow (as for a saved
    voice), and the next hop of tokens: one whole 50-frame chunk."""
    g = torch.Generator().manual_seed(0)
    vocab = flow.input_embedding.num_embeddings
    prompt_token, prompt_feat, embedding = random_voice(flow, g)
    voice = flow.new_stream(prompt_token, prompt_feat, embedding)
    with torch.inference_mode():
        flow.stream_step(voice, prompt_token[:, :0])  # the prompt's whole chunks, once
        # a stream's first chunk (the prompt's last, partial one), so the timed one is all new
        first = flow.stream_tokens_needed(voice, 0)
        flow.stream_step(voice, torch.randint(0, vocab, (1, first), generator=g))
    voice = voice.fork()
    hop = flow.stream_tokens_needed(voice, 0)  # one whole chunk past the look-ahead held
    return voice, torch.randint(0, vocab, (1, hop), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default=None, choices=[None, "int8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    # the engine stays referenced to the end: a collected one closes its flow's row split
    engine = Engine.load(args.model, dtype=args.dtype, quantize=args.quantize)
    try:
        run(args, engine.pipeline.flow)
    finally:
        engine.close()
    print(footer(floors, load_start))


def run(args: argparse.Namespace, flow: Any) -> None:
    """The table: each stream count's chunks computed the three ways."""
    voice, tokens = primed_voice(flow)
    cfm = flow.decoder
    splits = {"rows alone": cfm.stream_rows, "shares": cfm.stream_rows}
    if args.threads > 1:
        if not cfm.stream_rows.shares:
            raise SystemExit("ROW SHARES NOT CHOSEN: the engine's split computes rows alone")
        splits["rows alone"] = RowSplit(args.threads)

    def chunk_frames() -> int:
        probe = voice.fork()
        return int(flow.stream_step(probe, tokens).shape[2])

    frames = chunk_frames()
    if frames == 0:
        raise SystemExit("FIXED CHUNK NOT COMPUTED: the hop did not complete a flow chunk")
    print(
        f"{args.model.name} {args.dtype}{' + int8 products' if args.quantize else ''}, "
        f"{args.threads} threads: one chunk per stream, "
        f"{frames} new mel frames each (prompt {PROMPT_TOKENS} tokens)",
        flush=True,
    )
    print(
        f"{'streams':>8}{'one by one s':>14}{'rows alone s':>14}{'shares s':>10}"
        f"{'vs one by one':>15}{'vs rows alone':>15}{'per stream s':>14}{'max diff':>10}"
    )
    for count in (int(s) for s in args.streams.split(",")):
        best = dict.fromkeys(["one by one", *splits], float("inf"))
        mels: dict[str, list[torch.Tensor]] = {}
        for round_ in range(args.repeats):
            order = list(best) if round_ % 2 == 0 else list(best)[::-1]
            for way in order:
                streams = [voice.fork() for _ in range(count)]
                cfm.stream_rows = splits.get(way, splits["shares"])
                start = time.perf_counter()
                if way == "one by one":
                    mels[way] = [flow.stream_step(s, tokens) for s in streams]
                else:
                    mels[way] = flow.stream_steps(streams, [tokens] * count, [False] * count)
                best[way] = min(best[way], time.perf_counter() - start)
        cfm.stream_rows = splits["shares"]
        diff = max(
            float((a - b).abs().max())
            for way in splits
            for a, b in zip(mels["one by one"], mels[way], strict=True)
        )
        shares = best["shares"]
        print(
            f"{count:>8}{best['one by one']:>14.2f}{best['rows alone']:>14.2f}{shares:>10.2f}"
            f"{best['one by one'] / shares:>14.2f}x{best['rows alone'] / shares:>14.2f}x"
            f"{shares / count:>14.2f}{diff:>10.1e}",
            flush=True,
        )
    if splits["rows alone"] is not splits["shares"]:
        splits["rows alone"].close()


if __name__ == "__main__":
    main()
