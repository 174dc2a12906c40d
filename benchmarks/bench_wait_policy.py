"""How idle OpenMP threads wait: passive waiting (the CLI's default) vs a short spin vs OpenMP's
default spin, on the two workloads made of many small parallel operations.

One command: ``python benchmarks/bench_wait_policy.py --model DIR [--dtype bfloat16]
[--busy 0,4] [--rounds 2]``. For each count of busy processes beside it (``--busy``: that many
pure-Python busy loops, an oversubscribed machine), a worker process per policy (the variables
must be set before torch loads) times, with the engine's networks of a full-size CosyVoice2/3
directory: one streaming flow chunk (a primed 123-token voice, one whole 50-frame chunk; best of
2) and the median LLM decoding step (20 steps after a 150-position prefill). The policies run in
turn, ``--rounds`` times, and each figure is the median over rounds; ratios are passive / policy
(above 1: faster than passive). Prints the machine's load average and floors from the same run.
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
POLICIES = {  # name -> bench_v1.worker_env's wait policy for the worker
    "passive": "passive",
    "short spin": "spin",  # GOMP_SPINCOUNT=10000
    "OpenMP default": "default",
}
PREFILL = 150
STEPS = 20


def worker(model: str, dtype: str, threads: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_flow_batch import primed_voice

    from cosyvoice_lite.engine import Engine

    torch.set_num_threads(threads)
    # kept referenced until the end: a collected engine closes the flow's row split, and the
    # chunk would be timed on the serial path
    engine = Engine.load(model, dtype=dtype)
    flow, llm = engine.pipeline.flow, engine.pipeline.llm
    voice, tokens = primed_voice(flow)
    if threads > 1 and flow.decoder.stream_rows.threads < 2:
        raise SystemExit("ROW SPLIT NOT IN USE: the flow chunk would be timed on one thread")
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        chunk = float("inf")
        for _ in range(2):
            stream = voice.fork()
            start = time.perf_counter()
            frames = flow.stream_step(stream, tokens).shape[2]
            chunk = min(chunk, time.perf_counter() - start)
        if frames == 0:
            raise SystemExit("FIXED CHUNK NOT COMPUTED: the hop did not complete a flow chunk")
        width = llm.llm_decoder.in_features
        dt = getattr(torch, dtype)  # the LLM computes in the dtype its weights are stored in
        cache = llm.new_cache()
        llm.log_probs(torch.randn(1, PREFILL, width, generator=g).to(dt), [cache])
        steps = []
        for _ in range(STEPS):
            x = torch.randn(1, 1, width, generator=g).to(dt)
            start = time.perf_counter()
            llm.log_probs(x, [cache])
            steps.append(time.perf_counter() - start)
    engine.close()
    print(
        json.dumps(
            {"chunk_s": chunk, "frames": int(frames), "step_ms": 1e3 * statistics.median(steps)}
        )
    )


def run_worker(args: argparse.Namespace, policy: str) -> dict:
    from bench_v1 import worker_env

    env = worker_env(args.threads, POLICIES[policy])
    if POLICIES[policy] == "default":  # OpenMP's own default, not the caller's variable
        env.pop("OMP_WAIT_POLICY", None)
    argv = [sys.executable, __file__, "--worker", "--model", str(args.model), "--dtype", args.dtype]
    argv += ["--threads", str(args.threads)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{policy} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", default="0,4", help="busy processes beside the worker, per table")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(str(args.model), args.dtype, args.threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from floors import describe, footer, measure

    load_start = os.getloadavg()
    floors = describe(measure())
    print(f"{args.model.name} {args.dtype}, {args.threads} threads; ratio = passive / policy")
    for busy in (int(b) for b in args.busy.split(",")):
        hogs = busy_processes(busy)
        try:
            results: dict[str, list[dict]] = {p: [] for p in POLICIES}
            for _ in range(args.rounds):
                for policy in POLICIES:
                    results[policy].append(run_worker(args, policy))
        finally:
            for hog in hogs:
                hog.kill()
        print(
            f"\n{busy} busy processes beside the worker (load average now {os.getloadavg()[0]:.1f})"
        )
        print(f"{'policy':>16}{'flow chunk s':>14}{'ratio':>8}{'LLM step ms':>14}{'ratio':>8}")
        base = {
            k: statistics.median(r[k] for r in results["passive"]) for k in ("chunk_s", "step_ms")
        }
        for policy, runs in results.items():
            chunk = statistics.median(r["chunk_s"] for r in runs)
            step = statistics.median(r["step_ms"] for r in runs)
            print(
                f"{policy:>16}{chunk:>14.2f}{base['chunk_s'] / chunk:>7.2f}x"
                f"{step:>14.1f}{base['step_ms'] / step:>7.2f}x"
            )
    print(f"\n{footer(floors, load_start)}")


if __name__ == "__main__":
    main()
