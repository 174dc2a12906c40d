"""Where a CosyVoice2/3 stream's first audio goes, stage by stage, against this machine's floor.

One command: ``python benchmarks/bench_first_chunk.py --model DIR [--configs fp32,int8]
[--rounds 3]`` for a full-size directory (``tools/make_models.py --size full``). Issue 9 asks for
the first streamed chunk of a saved voice within 2.0 s in float32 and 1.0 s in bfloat16/int8
(CosyVoice2; CosyVoice3 3.0 / 1.5 s). This measures how far that is from what the machine can do.

Each config runs in its own process, as the server loads it (``Engine.load``; its captured graphs
traced first). A saved voice (the 4.9 s zh test prompt, primed once) then streams ``--rounds``
requests of exactly ``--tokens`` speech tokens (``max_speech_tokens`` + ``ignore_eos``; the audio
length is checked, the run stops with ``FIXED LENGTH NOT APPLIED`` otherwise), and every call on
the way to the first audio is timed where the engine makes it:

* the LLM's prefill (one call over the whole prefix), timed and its FLOPs counted;
* the decoding steps until the one completing the first piece (the official schedule: 25 tokens
  plus the prompt's pad to whole chunks, plus the 3-token look-ahead); each step reads every
  weight once, so its floor is the LLM's weight bytes over the memory bandwidth;
* the flow's call for that piece (the prompt's partial last chunk with the first hop), its
  FLOPs counted with its rows computed in the calling thread (FlopCounterMode sees one thread);
* the vocoder's call for that piece.

The floor of each stage is its work over the rate measured in the same run (precision_bench's
floors: memory bandwidth, the matmul rate of that config's products). The stages depend on each
other in that order, so their floors add up: the first audio cannot come sooner on this machine
whatever the code (a looser bound hides the prompt's partial chunk under decoding: printed too).
Another request counts the FLOPs (its timing unused). Prints per config the measured median of
each stage, its work, floor and ratio, the end-to-end first audio against the summed floor and
the target, the machine's load average and floors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = {2: {"fp32": 2.0, "bf16": 1.0, "int8": 1.0}, 3: {"fp32": 3.0, "bf16": 1.5, "int8": 1.5}}
TOKENS_PER_SECOND = 25
CHUNK_TOKENS = 25  # the streaming flows' training chunk (pipelines/v2.py TOKEN_HOP)


class Calls:
    """The calls of one request on the way to its first audio: (stage, start, end, detail), with
    their FLOPs while ``count`` is set (the first call of each stage only)."""

    def __init__(self, int8_layers: list) -> None:
        self.events: list[tuple[str, float, float, dict]] = []
        self.int8_layers = int8_layers  # counted by hooks: FlopCounterMode cannot see onnxruntime
        self.count = False
        self.start = time.perf_counter()
        self._inside = threading.local()

    def reset(self, count: bool = False) -> None:
        self.events, self.count, self.start = [], count, time.perf_counter()

    def wrap(self, stage: str, fn, detail=lambda args, out: {}):  # noqa: ANN001, ANN201
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if getattr(self._inside, "depth", 0):  # nested: the outer call is the one timed
                return fn(*args, **kwargs)
            self._inside.depth = 1
            try:
                counting = self.count and not self._seen(stage)
                start = time.perf_counter()
                with _flops(counting, self.int8_layers) as tally:
                    out = fn(*args, **kwargs)
                end = time.perf_counter()
            finally:
                self._inside.depth = 0
            info = {**detail(args, out), "flops": tally[0] if counting else None}
            self.events.append((stage, start - self.start, end - self.start, info))
            return out

        return call

    def _seen(self, stage: str) -> bool:
        return any(event[0] == stage for event in self.events)


@contextlib.contextmanager
def _flops(active: bool, int8_layers: list):  # noqa: ANN202
    """FLOPs of the block in the calling thread (FlopCounterMode with the packed products' and
    the CPU attention's formulas, plus ``int8_layers``, which run on onnxruntime where it cannot
    see them) as ``tally[0]``."""
    tally = [0]
    if not active:
        yield tally
        return
    from bench_v1 import thread_flop_counter

    caller = threading.get_ident()

    def int8_layer(module, inputs, output) -> None:  # noqa: ANN001
        if threading.get_ident() == caller:  # not another thread's calls (decoding beside)
            tally[0] += 2 * inputs[0].numel() * module.out_features  # rows x in x out

    hooks = [module.register_forward_hook(int8_layer) for module in int8_layers]
    try:
        with thread_flop_counter() as counter:
            yield tally
        tally[0] += counter.get_total_flops()
    finally:
        for hook in hooks:
            hook.remove()


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from bench_v1 import rows_in_caller
    from bench_v2v3 import PROMPT_WAV, SENTENCE, prompt_transcript
    from precision_bench import check_fixed_length, llm_bytes_per_token

    from cosyvoice_lite.engine import Engine
    from cosyvoice_lite.quantized_linear import Int8Linear, Int8MatmulLinear
    from cosyvoice_lite.request import Mode, SynthesisRequest

    dtype, quantize = json.loads(args.load)
    engine = Engine.load(
        args.model, dtype=dtype, quantize=quantize, share_onnx_threads=True, download=False
    )
    if engine.version not in TARGETS:
        engine.close()
        raise SystemExit(
            f"{args.model} is CosyVoice v{engine.version}: this measures CosyVoice2/3 streams "
            "(issue 9's first-chunk targets are theirs)"
        )
    engine.wait_until_warm(900)
    pipeline = engine.pipeline
    llm, flow, hift = pipeline.llm, pipeline.flow, pipeline.hift
    int8 = (Int8Linear, Int8MatmulLinear)
    calls = Calls([m for m in (*llm.modules(), *flow.modules()) if isinstance(m, int8)])
    llm.log_probs = calls.wrap(
        "llm", llm.log_probs, lambda args, out: {"positions": int(args[0].shape[1])}
    )
    flow.stream_steps = calls.wrap(
        "flow",
        flow.stream_steps,
        lambda args, out: {"tokens": [t.shape[1] for t in args[1]], "frames": out[0].shape[-1]},
    )
    for method in ("stream_step", "stream_steps"):
        if callable(getattr(hift, method, None)):
            setattr(hift, method, calls.wrap("vocoder", getattr(hift, method)))
    voice = engine.encode_prompt(PROMPT_WAV, prompt_transcript())
    engine.prepare_voice(voice).result()
    # the flow's prompt tokens (aligned with its mel frames), whose pad to whole chunks the first
    # piece carries
    prompt_tokens = int(voice.aligned(flow.token_mel_ratio).speech_tokens.shape[1])

    def request(seed: int, count: bool) -> dict:
        calls.reset(count)
        req = SynthesisRequest(
            Mode.ZERO_SHOT,
            SENTENCE,
            seed=seed,
            stream=True,
            max_speech_tokens=args.tokens,
            ignore_eos=True,
        )
        first, samples = None, 0
        with rows_in_caller(engine, count):
            for chunk in engine.synthesize(req, prompt=voice):
                if first is None and chunk.samples.size:
                    first = time.perf_counter() - calls.start
                samples += chunk.samples.size
        per_token = engine.sample_rate / TOKENS_PER_SECOND
        check_fixed_length(args.config, args.tokens, samples, per_token, tolerance=0)
        return {"first_audio_s": first, **stages(calls.events)}

    rounds = [request(seed, count=False) for seed in range(args.rounds)]
    counted = request(args.rounds, count=True)
    emit = {
        "config": args.config,
        "version": engine.version,
        "rounds": rounds,
        "counted": counted,
        "llm_bytes_per_token": llm_bytes_per_token(llm),
        "prompt_tokens": prompt_tokens,
        "lookahead": pipeline.lookahead,
    }
    engine.close()
    print(json.dumps(emit))


def stages(events: list[tuple[str, float, float, dict]]) -> dict:
    """The stages of a request up to its first audio, from its calls in time order."""
    prefill = next(e for e in events if e[0] == "llm" and e[3]["positions"] > 1)
    flow = next(e for e in events if e[0] == "flow")
    vocoder = next(e for e in events if e[0] == "vocoder" and e[1] >= flow[2])
    steps = [e for e in events if e[0] == "llm" and e[3]["positions"] == 1 and e[2] <= flow[1]]
    return {
        "before_prefill_s": prefill[1],
        "prefill_s": prefill[2] - prefill[1],
        "prefill_positions": prefill[3]["positions"],
        "prefill_flops": prefill[3]["flops"],
        "decoding_s": flow[1] - prefill[2],
        "steps": len(steps),
        "step_s": statistics.median([e[2] - e[1] for e in steps]) if steps else None,
        "flow_s": flow[2] - flow[1],
        "flow_tokens": flow[3]["tokens"][0],
        "flow_frames": flow[3]["frames"],
        "flow_flops": flow[3]["flops"],
        "vocoder_wait_s": vocoder[1] - flow[2],
        "vocoder_s": vocoder[2] - vocoder[1],
        "vocoder_flops": vocoder[3]["flops"],
    }


# ----------------------------------------------------------------------------- driver
def median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def llm_rate(dtype: str, quantize: str | None, floors: dict) -> float:
    """GFLOP/s of a config's LLM products (a prefill is compute-bound)."""
    if quantize == "int8":
        return floors["int8_gflops"]
    return floors["bf16_gflops" if dtype == "bfloat16" else "fp32_gflops"]


def report(result: dict, floors: dict) -> None:
    from precision_bench import flow_rate

    name, rounds, counted = result["config"], result["rounds"], result["counted"]
    version, prompt_tokens = result["version"], result["prompt_tokens"]
    dtype, quantize = result["load"]
    bandwidth = floors["memory_bandwidth_gbs"] * 1e9
    rate = flow_rate(name, floors) * 1e9
    prefill_floor = counted["prefill_flops"] / (llm_rate(dtype, quantize, floors) * 1e9)
    steps = rounds[0]["steps"]
    step_floor = result["llm_bytes_per_token"] / bandwidth
    flow_floor = counted["flow_flops"] / rate
    vocoder_floor = counted["vocoder_flops"] / rate
    floor = prefill_floor + steps * step_floor + flow_floor + vocoder_floor
    # the looser bound: the flow call's first chunk (the prompt's partial one, when the prompt
    # is not whole chunks) computed under decoding, its share of the call's FLOPs by chunks
    partial = prompt_tokens % CHUNK_TOKENS
    solved = partial + counted["flow_tokens"] - result["lookahead"]  # the call's chunks' tokens
    chunks = max(1, round(solved / CHUNK_TOKENS))
    hidden = flow_floor / chunks if partial else 0.0
    loose = floor - min(hidden, steps * step_floor)
    first = median(rounds, "first_audio_s")
    rows = [
        ("text to the prefill", median(rounds, "before_prefill_s"), "", None),
        (
            f"prefill ({rounds[0]['prefill_positions']} positions)",
            median(rounds, "prefill_s"),
            f"{counted['prefill_flops'] / 1e9:.0f} GFLOP",
            prefill_floor,
        ),
        (
            f"decoding to the first piece ({steps} steps)",
            median(rounds, "decoding_s"),
            f"{steps} x {result['llm_bytes_per_token'] / 1e9:.2f} GB",
            steps * step_floor,
        ),
        (
            f"flow, first piece ({rounds[0]['flow_tokens']} tokens -> "
            f"{rounds[0]['flow_frames']} frames)",
            median(rounds, "flow_s"),
            f"{counted['flow_flops'] / 1e9:.0f} GFLOP",
            flow_floor,
        ),
        ("flow to vocoder", median(rounds, "vocoder_wait_s"), "", None),
        (
            "vocoder, first piece",
            median(rounds, "vocoder_s"),
            f"{counted['vocoder_flops'] / 1e9:.1f} GFLOP",
            vocoder_floor,
        ),
        ("first audio, end to end", first, "", floor),
    ]
    target = TARGETS.get(version, TARGETS[2]).get(name)
    print(
        f"\n{name} (dtype {dtype}, quantize {quantize}), medians of {len(rounds)} requests; "
        f"decoding step median {median(rounds, 'step_s') * 1e3:.1f} ms"
    )
    print(f"  {'stage':<46} {'measured s':>10}  {'work':<16} {'floor s':>8} {'x floor':>8}")
    for label, measured, work, stage_floor in rows:
        ratio = f"{measured / stage_floor:.2f}x" if stage_floor else ""
        floor_text = f"{stage_floor:.2f}" if stage_floor is not None else ""
        print(f"  {label:<46} {measured:>10.2f}  {work:<16} {floor_text:>8} {ratio:>8}")
    print(f"  floor with the prompt's partial chunk hidden under decoding: {loose:.2f} s")
    if target:
        verdict = "below this machine's floor" if target < loose else "above the floor"
        print(
            f"  target {target:.1f} s: {target / floor:.2f}x the floor, {target / loose:.2f}x the "
            f"looser one ({verdict})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a full-size v2 or v3 directory")
    parser.add_argument("--configs", default="fp32,int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=60, help="speech tokens per request")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from floors import describe
    from precision_bench import configs, measure_floors

    load_start = os.getloadavg()
    print("measuring the floors ...", flush=True)
    floors = measure_floors(args.threads)
    for name, load in configs(args.configs, floors).items():
        print(f"[{name}] loading and streaming {args.rounds + 1} requests ...", flush=True)
        argv = [sys.executable, __file__, "--worker", "--config", name, "--load", json.dumps(load)]
        argv += ["--model", str(args.model), "--rounds", str(args.rounds)]
        argv += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"[{name}] failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["load"] = load
        report(result, floors)
    end = os.getloadavg()
    print(f"\n{describe(floors)}")
    print(f"load average at start {load_start[0]:.2f}, at end {end[0]:.2f}")


if __name__ == "__main__":
    main()
