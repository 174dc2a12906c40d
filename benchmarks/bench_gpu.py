"""CosyVoice2/3 on a GPU (or any torch device): the figures issues 8 and 9 ask of a lent GPU.

One command (full-size random-weight directories made by ``tools/make_models.py --size full``):

    python benchmarks/bench_gpu.py --model /tmp/m/v2 --model /tmp/m/v3 --device cuda \
        --json gpu.json

benchmarks/README.md ("A lent GPU") gives the whole device command: the wheels to carry, making
the models there, the time limit. For each model and ``--dtypes`` (float32, bfloat16, float16),
through the engine loop the server uses (``Engine.submit``; a saved voice from the 4.9 s zh test
prompt, primed once):

* LLM decoding step, batch 1 and ``--batch``: median ms per step (the network alone, after a
  150-position prefill per row), against its floor (weight bytes / measured memory bandwidth);
* one request of ``--tokens`` speech tokens, whole: total RTF;
* offline batch: ``--batch`` whole requests at once: aggregate RTF (wall / audio seconds; the
  published Triton TRT-LLM figure for CosyVoice2 on an L20 is 0.039 at batch 16), with their
  flow in padded batches (``batch_utterances``, the default on a GPU) and, for the ratio, one
  utterance at a time (the previous design);
* streaming at ``--concurrency`` (default 1 and 4): p50/p95 time to first audio, audio s/s;
* peak device memory of each.

Random weights rarely emit eos: every request decodes exactly ``--tokens`` tokens
(``max_speech_tokens`` + ``ignore_eos``), and the run stops with ``FIXED LENGTH NOT APPLIED`` if
any response has another length. ``--time-limit`` skips what would not finish in time (a lent GPU
has 15 minutes in all), so the figures measured so far always come back. On a CPU the same
command is a dry run (``--device cpu --model tests/data/models/v2-tiny``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from floors import describe, measure  # noqa: E402
from precision_bench import llm_bytes_per_token  # noqa: E402

from cosyvoice_lite.device import configure_backend, resolve_placement  # noqa: E402
from cosyvoice_lite.engine import Engine  # noqa: E402
from cosyvoice_lite.request import Mode, SynthesisRequest  # noqa: E402

PROMPT_WAV = ROOT / "tests" / "data" / "audio" / "zh_16k.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"
PREFILL = 150  # positions per row before the timed decoding steps


@dataclass
class Timed:
    """A sink that records when each chunk of one request arrived."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    samples: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    end_time: float = 0.0

    def chunk(self, chunk) -> None:  # noqa: ANN001 - AudioChunk
        if self.first is None:
            self.first = time.perf_counter() - self.start
        self.samples += len(chunk.samples)

    def end(self, error: BaseException | None) -> None:
        self.error, self.end_time = error, time.perf_counter() - self.start
        self.done.set()


class ModelBench:
    def __init__(self, engine: Engine, tokens: int) -> None:
        self.engine, self.tokens = engine, tokens
        self.sync = (
            (lambda: torch.cuda.synchronize(engine.placement.device))
            if engine.placement.device.type == "cuda"
            else (lambda: None)
        )
        self.voice = engine.encode_prompt(str(PROMPT_WAV), PROMPT_TEXT)
        engine.prepare_voice(self.voice).result()  # the saved voice's prompt frames, once

    def requests(self, count: int, stream: bool, tokens: int | None = None) -> dict:
        """``count`` requests submitted at once; their timings, checked for the fixed length."""
        tokens = tokens or self.tokens
        sinks = []
        start = time.perf_counter()
        for seed in range(count):
            request = SynthesisRequest(
                Mode.ZERO_SHOT,
                TEXT,
                seed=seed,
                stream=stream,
                max_speech_tokens=tokens,
                ignore_eos=True,
            )
            sink = Timed()
            self.engine.submit(request, sink, prompt=self.voice)
            sinks.append(sink)
        for sink in sinks:
            sink.done.wait()
            if sink.error is not None:
                raise sink.error
        wall = time.perf_counter() - start
        rate = self.engine.sample_rate
        expected = tokens / self.engine.spec.token_frame_rate
        for sink in sinks:
            seconds = sink.samples / rate
            if abs(seconds - expected) > 0.03 * expected + 0.05:
                raise SystemExit(
                    f"FIXED LENGTH NOT APPLIED: {seconds:.2f} s of audio, expected {expected:.2f}"
                )
        audio = sum(s.samples for s in sinks) / rate
        firsts = sorted(s.first for s in sinks)
        return {
            "requests": count,
            "wall_s": wall,
            "audio_s": audio,
            "rtf": wall / audio,
            "audio_s_per_s": audio / wall,
            "first_p50_s": statistics.median(firsts),
            "first_p95_s": firsts[min(len(firsts) - 1, round(0.95 * (len(firsts) - 1)))],
        }

    def llm_step_ms(self, rows: int, steps: int = 20) -> float:
        """Median ms of one decoding step of ``rows`` rows (the network alone)."""
        lm = self.engine.pipeline.llm
        device = self.engine.placement.device
        dtype = lm.llm_decoder.weight.dtype if hasattr(lm.llm_decoder, "weight") else torch.float32
        width = lm.llm_decoder.in_features
        caches = [lm.new_cache() for _ in range(rows)]
        times = []
        with torch.inference_mode():
            for cache in caches:
                lm.log_probs(torch.randn(1, PREFILL, width, device=device, dtype=dtype), [cache])
            for _ in range(steps):
                x = torch.randn(rows, 1, width, device=device, dtype=dtype)
                self.sync()
                start = time.perf_counter()
                lm.log_probs(x, caches)
                self.sync()
                times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_model(model: str, dtype: str, args: argparse.Namespace, floors: dict, deadline: float):
    """Every figure of one model in one precision (skipping what the deadline leaves no time
    for); yields (name, figures) as each is measured."""
    # each precision set up as in a process of its own (TF32: the previous load's switches)
    configure_backend(resolve_placement(args.device, dtype), fresh=True)
    engine = Engine.load(
        model,
        device=args.device,
        dtype=dtype,
        max_batch=max(args.batch, *args.concurrency),
        # Engine.load's 256 MB per stream is sized for a CPU's memory: a 4 s float32 CosyVoice2
        # stream passes it after ~1 s of audio, and its later pieces would measure the re-solving
        # fallback (each stream alone), not streaming
        stream_cache_mb=args.stream_cache_mb,
    )
    device = engine.placement.device
    try:
        bench = ModelBench(engine, args.tokens)
        # warm-up (lazily loaded kernels, library plans, caches): streamed and whole, one
        # request and a batch, so that no timed stage pays a first use; a failure is reported
        # and the stages go on (each fails alone)
        warm = min(args.tokens, 40)
        for count, stream in ((1, True), (1, False), (args.batch, False)):
            try:
                bench.requests(count, stream=stream, tokens=warm)
            except Exception as exc:  # noqa: BLE001 - a lent GPU's run goes on
                yield f"warm-up, {count} {'streamed' if stream else 'whole'}", failed(exc)
        floor_ms = llm_bytes_per_token(engine.pipeline.llm) / (floors["memory_bandwidth_gbs"] * 1e6)
        for rows in (1, args.batch):
            try:
                step = bench.llm_step_ms(rows)
            except Exception as exc:  # noqa: BLE001 - a lent GPU's run goes on
                yield f"llm step, batch {rows}", failed(exc)
                continue
            yield f"llm step, batch {rows}", {"ms": step, "floor_ms": floor_ms}
        default = engine.pipeline.utterance_batch  # whole utterances per flow batch
        stages = [
            ("one request, whole", 1, False, default),
            (f"offline batch {args.batch}, whole", args.batch, False, args.batch),
            (f"offline batch {args.batch}, flow 1 by 1", args.batch, False, 1),
        ]
        stages += [(f"streaming, concurrency {c}", c, True, default) for c in args.concurrency]
        for name, count, stream, utterances in stages:
            if time.monotonic() > deadline:
                yield name, {"skipped": "time limit"}
                continue
            reset_peak(device)
            engine.pipeline.utterance_batch = utterances
            batches = engine.loop.utterance_batches
            try:
                figures = bench.requests(count, stream)
            except Exception as exc:  # noqa: BLE001 - a lent GPU's run goes on
                yield name, failed(exc)
                continue
            figures["utterance_batches"] = engine.loop.utterance_batches - batches
            figures["peak_mib"] = peak_memory_mib(device)
            yield name, figures
    finally:
        engine.close()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


def failed(exc: BaseException) -> dict:
    """A stage's error, its traceback printed: one device call measures what it can."""
    traceback.print_exception(exc)
    return {"failed": repr(exc)}


def show(name: str, figures: dict) -> str:
    if "failed" in figures:
        return f"  {name:<34} FAILED {figures['failed']}"
    if "skipped" in figures:
        return f"  {name:<34} skipped ({figures['skipped']})"
    if "ms" in figures:
        return (
            f"  {name:<34} {figures['ms']:8.2f} ms/step "
            f"(floor {figures['floor_ms']:.2f} ms, {figures['ms'] / figures['floor_ms']:.1f}x)"
        )
    peak = "" if figures["peak_mib"] is None else f", peak {figures['peak_mib']:.0f} MiB"
    if figures.get("utterance_batches"):
        peak += f", {figures['utterance_batches']} batched flow calls"
    return (
        f"  {name:<34} RTF {figures['rtf']:.4f}, {figures['audio_s_per_s']:.1f} audio s/s, "
        f"first audio p50 {figures['first_p50_s']:.3f} s / p95 {figures['first_p95_s']:.3f} s"
        f"{peak}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds in all")
    parser.add_argument(
        "--stream-cache-mb",
        type=int,
        default=None,
        help="each stream's own flow cache threshold (Engine.load; default: unbounded)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here too")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    deadline = time.monotonic() + args.time_limit
    floors = measure(args.device)
    print(describe(floors), flush=True)
    results: dict = {"floors": {k: v for k, v in floors.items()}, "runs": []}
    for model in args.model:
        for dtype in args.dtypes.split(","):
            if time.monotonic() > deadline:
                print(f"{model} {dtype}: skipped (time limit)", flush=True)
                continue
            budget = "unbounded" if args.stream_cache_mb is None else f"{args.stream_cache_mb} MB"
            print(
                f"{Path(model).name} {dtype}, {args.tokens} tokens per request, each stream's "
                f"flow caches {budget}:",
                flush=True,
            )
            try:
                for name, figures in run_model(model, dtype, args, floors, deadline):
                    print(show(name, figures), flush=True)
                    results["runs"].append(
                        {"model": model, "dtype": dtype, "stage": name, **figures}
                    )
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=1))
            except Exception as exc:  # noqa: BLE001 - loading failed; the next run may not
                print(show("load", failed(exc)), flush=True)
    print(describe(floors))


if __name__ == "__main__":
    main()
