"""The flow's rows on threads with one torch thread each vs one batch on torch's threads.

One command: ``python benchmarks/bench_row_split.py --model DIR [--dtype bfloat16] [--threads 2]
[--repeats 2]`` (a full-size CosyVoice2/3 directory). The flow estimator's rows (a stream's
conditional and unconditional rows) are computed two ways in the same run, each from a worker
thread as in the engine's audio workers:

* batch (the previous design): one estimator call for both rows, the worker using ``--threads``
  torch threads (OpenMP's parallel operations, each waking the sleeping OpenMP threads under
  the passive wait policy);
* rows (``RowSplit``): each row computed alone on its own thread with one torch thread (the
  engine's way on a CPU until 2026-12-05; with two rows, as here, the same as its one share per
  thread now, ``RowSplit(threads, shares=True)``; several streams: ``bench_flow_batch.py``).

Workloads: a saved voice's first streamed call (the prompt's last, partial chunk plus the first
tokens), one whole streamed chunk (50 new mel frames), and a whole utterance (100 tokens after a
123-token prompt, non-streaming). Printed: best of ``--repeats`` (alternating) for both, the
speed-up, the largest mel difference, then the load average and floors measured in the run.
The engine keeps float32 whole utterances in one batch only with ``exact_float32`` (bit-identical
to the official); the utterance row is shown for every dtype so the trade-off is visible.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_flow_batch import PROMPT_TOKENS, random_voice  # noqa: E402
from floors import describe, footer, measure  # noqa: E402

from cosyvoice_lite.engine import Engine  # noqa: E402
from cosyvoice_lite.row_parallel import SERIAL, RowSplit  # noqa: E402

UTTERANCE_TOKENS = 100


def in_worker(threads: int, fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """``fn`` timed in a fresh thread using ``threads`` torch threads (as an audio worker)."""
    out: list[Any] = []

    def run() -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            start = time.perf_counter()
            mel = fn()
            out.extend([time.perf_counter() - start, mel])

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if not out:
        raise SystemExit("the timed call failed (see the traceback above)")
    return out[0], out[1]


def workloads(flow: Any) -> dict[str, Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    prompt, feat, embedding = random_voice(flow, g)
    vocab = flow.input_embedding.num_embeddings
    with torch.inference_mode():
        # the prompt's whole chunks, once (a saved voice); streams are forks of it
        voice = flow.new_stream(prompt, feat, embedding)
        flow.stream_step(voice, prompt[:, :0])
        first = torch.randint(0, vocab, (1, flow.stream_tokens_needed(voice, 0)), generator=g)
        # the same voice after its first call: the timed chunk is all new frames
        primed = flow.new_stream(prompt, feat, embedding)
        flow.stream_step(primed, prompt[:, :0])
        if flow.stream_step(primed, first).shape[2] == 0:
            raise SystemExit("FIXED CHUNK NOT COMPUTED: the first tokens made no flow call")
        hop = torch.randint(0, vocab, (1, flow.stream_tokens_needed(primed, 0)), generator=g)
    new = torch.randint(0, vocab, (1, UTTERANCE_TOKENS), generator=g, dtype=torch.int32)
    whole = dict(
        token=new,
        token_len=torch.tensor([UTTERANCE_TOKENS], dtype=torch.int32),
        prompt_token=prompt.int(),
        prompt_token_len=torch.tensor([PROMPT_TOKENS], dtype=torch.int32),
        prompt_feat=feat,
        prompt_feat_len=torch.tensor([2 * PROMPT_TOKENS], dtype=torch.int32),
        embedding=embedding,
        streaming=False,
        finalize=True,
    )

    def chunk() -> torch.Tensor:
        mel = flow.stream_step(primed.fork(), hop)
        if mel.shape[2] == 0:
            raise SystemExit("FIXED CHUNK NOT COMPUTED: the hop did not complete a flow chunk")
        return mel

    return {
        "first streamed call (saved voice)": lambda: flow.stream_step(voice.fork(), first),
        "one streamed chunk": chunk,
        f"whole utterance ({UTTERANCE_TOKENS} tokens)": lambda: flow.inference(**whole)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    floors = describe(measure())
    engine = Engine.load(args.model, dtype=args.dtype)
    flow = engine.pipeline.flow
    rows = RowSplit(args.threads)
    cases = workloads(flow)
    print(
        f"{args.model.name} {args.dtype}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; best of {args.repeats}"
    )
    print(f"{'workload':<36}{'batch s':>9}{'rows s':>9}{'speed-up':>10}{'max diff':>10}")
    for name, fn in cases.items():
        best = {"batch": float("inf"), "rows": float("inf")}
        mels: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for design, split, threads in (("batch", SERIAL, args.threads), ("rows", rows, 1)):
                flow.decoder.set_row_split(split)
                seconds, mels[design] = in_worker(threads, fn)
                best[design] = min(best[design], seconds)
        diff = float((mels["batch"] - mels["rows"]).abs().max())
        print(
            f"{name:<36}{best['batch']:>9.2f}{best['rows']:>9.2f}"
            f"{best['batch'] / best['rows']:>9.2f}x{diff:>10.1e}",
            flush=True,
        )
    rows.close()
    engine.close()
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
