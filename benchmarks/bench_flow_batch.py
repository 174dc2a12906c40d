"""Streams' flow chunks computed together vs one by one (CosyVoice2/3, the engine's audio stage).

One command: ``python benchmarks/bench_flow_batch.py --model DIR [--streams 1,2,4,8]
[--dtype float32] [--repeats 3]``. A voice's prompt goes through the streaming flow once (as for
a saved voice); then, for each count S, S streams forked from it each receive one hop of tokens
(one whole chunk: 50 new mel frames) and the chunks are computed two ways in the same run:
one `stream_step` per stream (the previous design) and one `stream_steps` call for all S (the
batch). Printed per S: best time of both, the speed-up, the time per stream, and the largest
difference between a stream's mel in the batch and alone (0.0: bit-identical); then the machine's
load average and floors (memory bandwidth, fp32/bf16 matmul) measured in the run.
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    flow = Engine.load(args.model, dtype=args.dtype).pipeline.flow
    voice, tokens = primed_voice(flow)

    def chunk_frames() -> int:
        probe = voice.fork()
        return int(flow.stream_step(probe, tokens).shape[2])

    frames = chunk_frames()
    if frames == 0:
        raise SystemExit("FIXED CHUNK NOT COMPUTED: the hop did not complete a flow chunk")
    print(
        f"{args.model.name} {args.dtype}, {args.threads} threads: one chunk per stream, "
        f"{frames} new mel frames each (prompt {PROMPT_TOKENS} tokens)",
        flush=True,
    )
    print(
        f"{'streams':>8}{'one by one s':>14}{'together s':>12}{'speed-up':>10}"
        f"{'per stream s':>14}{'max diff':>10}"
    )
    for count in (int(s) for s in args.streams.split(",")):
        alone_best = together_best = float("inf")
        for _ in range(args.repeats):
            streams = [voice.fork() for _ in range(count)]
            start = time.perf_counter()
            alone = [flow.stream_step(s, tokens) for s in streams]
            alone_best = min(alone_best, time.perf_counter() - start)
            streams = [voice.fork() for _ in range(count)]
            start = time.perf_counter()
            together = flow.stream_steps(streams, [tokens] * count, [False] * count)
            together_best = min(together_best, time.perf_counter() - start)
        diff = max(float((a - b).abs().max()) for a, b in zip(alone, together, strict=True))
        print(
            f"{count:>8}{alone_best:>14.2f}{together_best:>12.2f}"
            f"{alone_best / together_best:>9.2f}x{together_best / count:>14.2f}{diff:>10.1e}",
            flush=True,
        )
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
