"""Speed benchmark of CosyVoice2 / CosyVoice3 (zero-shot cloning, streaming and not): cosyvoice-lite vs the official code.

    .venv/bin/python benchmarks/bench_v2v3.py --version 2
    .venv/bin/python benchmarks/bench_v2v3.py --version 3 --official-python /tmp/refenv/bin/python \\
        --official-path /tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS
    .venv/bin/python benchmarks/bench_v2v3.py --version 2 --repeats 0 --growth-tokens 300 ...  # per chunk

(or set COSYVOICE_OFFICIAL_PYTHON / COSYVOICE_OFFICIAL_PATH). The full-size random-weight model
directories are generated with tools/make_models.py on first use (benchmarks/out/, git-ignored).

Same structure as benchmarks/bench_v1.py (whose helpers it reuses): each implementation runs in
its own worker process (this file with ``--worker`` for ours, benchmarks/official_v2v3.py for the
official ``CosyVoice2`` / ``CosyVoice3`` classes); the driver sends both the same requests in
alternation; every request decodes a fixed number of speech tokens; figures are medians.

Phases of a run, after loading: a warm-up, then ``--repeats`` x (non-streaming request, streaming
request) per implementation; then, when ``--growth-tokens`` is set, one streaming
request whose speech tokens are *replayed* (the LLM is replaced by a fixed token list, the same in
both implementations) so that the per-chunk cost of flow + vocoder is measured alone: the official
re-runs the flow (v3: and the vocoder) over everything generated so far at every chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_v1 import (  # noqa: E402  (standard library only at import time)
    StageTimer,
    Worker,
    add_comparison_args,
    close_workers,
    comparison_workers,
    flop_counter,
    generate_model,
    load_workers,
    print_load_average,
    run_benchmark,
    serve,
    set_threads,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODEL_DIRS = {2: OUT / "CosyVoice2-0.5B", 3: OUT / "Fun-CosyVoice3-0.5B-2512"}
OFFICIAL_WORKER = ROOT / "benchmarks" / "official_v2v3.py"

# The fixed workload: a 40-character Chinese sentence (one text segment in both frontends, checked),
# cloned from the zh test prompt (4.9 s, 123 speech tokens) with its transcript.
SENTENCE = "今天天气晴朗，我们一起去公园散步，看看湖边盛开的美丽花朵和天空中自由飞翔的小鸟。"
PROMPT_WAV = ROOT / "tests" / "data" / "audio" / "zh_16k.wav"
PROMPTS_JSON = ROOT / "tests" / "data" / "audio" / "prompts.json"
SEED = 1986
STREAM_CACHE_MB = 256  # Engine.load's default: what a user's streams get
SPEECH_TOKEN_SIZE = 6561
SAMPLES_PER_TOKEN = 2 * 480  # 2 mel frames per speech token, 480 samples per frame (24 kHz)
# CosyVoice3 drops runs of more than 5 of these (official llm_job); replayed tokens avoid them
V3_SILENT_TOKENS = {1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323}
# stage -> entry points wrapped with its timer, where the loaded network has them (ours: the
# incremental streaming steps too, every one of which goes through ``stream_steps``; the official
# has only ``inference``)
STAGE_METHODS = {
    "flow": ("inference", "new_stream", "stream_steps"),
    "hift": ("inference", "new_stream", "stream_step"),
}


def prompt_transcript() -> str:
    return json.loads(PROMPTS_JSON.read_text(encoding="utf-8"))["files"][PROMPT_WAV.name][
        "transcript"
    ]


# ----------------------------------------------------------------------------- shared by workers
class FixedSpeechLength:
    """Wrap a sampler ``(scores, decoded, *extra) -> id`` so that decoding yields exactly ``n``
    speech tokens: every non-speech id (``>= speech_token_size``: eos, the v3 stop ids, fill) is
    masked before ``n`` and ``eos`` is chosen at ``n``. v2/v3 have several stop ids (v3: 200), so
    masking only the eos as bench_v1's ``FixedLength`` does is not enough with random weights."""

    def __init__(self, sampler: Callable, speech_token_size: int, eos: int, n: int) -> None:
        self.sampler, self.speech_token_size, self.eos, self.n = sampler, speech_token_size, eos, n

    def __call__(self, scores, decoded, *extra):
        if len(decoded) >= self.n:
            return self.eos
        scores[self.speech_token_size :] = -float("inf")
        return self.sampler(scores, decoded, *extra)


def replay_tokens(n: int, seed: int) -> list[int]:
    """A fixed list of speech tokens for the replay requests: no CosyVoice3 silence tokens, and
    no token again within 10 of itself (the sampler's repetition window: a repeat there makes it
    draw again from the rest of the replay's one-hot distribution, which has nothing left)."""
    rng = random.Random(seed)
    tokens: list[int] = []
    while len(tokens) < n:
        token = rng.randrange(SPEECH_TOKEN_SIZE)
        if token not in V3_SILENT_TOKENS and token not in tokens[-10:]:
            tokens.append(token)
    return tokens


def wrap_stages(timer: StageTimer, flow, hift) -> None:
    """Time every flow / vocoder entry point the loaded networks have (instance attributes)."""
    for stage, network in (("flow", flow), ("hift", hift)):
        for method in STAGE_METHODS[stage]:
            if callable(getattr(network, method, None)):
                setattr(network, method, timer.wrap(stage, getattr(network, method)))


class ChunkLog:
    """Arrival time of each audio chunk of one request and the flow + vocoder time spent since
    the previous chunk (read from the stage timer)."""

    def __init__(self, timer: StageTimer, start: float) -> None:
        self.timer, self.start, self.chunks = timer, start, []
        self._compute = 0.0

    def add(self, samples: int) -> None:
        compute = self.timer.seconds.get("flow_s", 0.0) + self.timer.seconds.get("hift_s", 0.0)
        self.chunks.append(
            {
                "t": time.perf_counter() - self.start,
                "samples": samples,
                "compute_s": compute - self._compute,
            }
        )
        self._compute = compute


# ----------------------------------------------------------------------------- our worker
class Replay:
    """Stands in for the LLM's ``log_probs`` in the replay requests: every step returns a
    distribution with all its mass on the next token of a fixed list, so the engine decodes
    exactly that list (through its own sampler, length policy and loop) without LLM work."""

    def __init__(self, log_probs: Callable, vocab: int) -> None:
        self.log_probs, self.vocab, self.tokens = log_probs, vocab, None

    def __call__(self, inputs, caches):
        if self.tokens is None:
            return self.log_probs(inputs, caches)
        import torch

        rows = torch.full((len(caches), self.vocab), -float("inf"))
        rows[:, self.tokens.pop(0) if self.tokens else 0] = 0.0
        return rows


def our_worker(
    model_dir: Path,
    threads: int,
    dtype: str = "float32",
    quantize: str | None = None,
    stream_cache_mb: int | None = STREAM_CACHE_MB,
) -> None:
    set_threads(threads)
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT / "src"))
    from bench_v1 import counted, rows_in_caller
    from precision_bench import llm_bytes_per_token

    from cosyvoice_lite.engine import Engine
    from cosyvoice_lite.request import Mode, SynthesisRequest

    import_seconds = time.perf_counter() - start

    def load():
        start = time.perf_counter()
        engine = Engine.load(
            model_dir,
            device="cpu",
            dtype=dtype,
            quantize=quantize,
            stream_cache_mb=stream_cache_mb,
            share_onnx_threads=True,  # as the CLI and the server load
        )
        load_seconds = time.perf_counter() - start
        pipeline, timer, state = engine.pipeline, StageTimer(), {"flops": {}}
        llm = pipeline.llm
        llm_bytes = llm_bytes_per_token(llm)
        replay = Replay(llm.log_probs, llm.llm_decoder.out_features)
        llm.log_probs = timer.wrap("llm", replay)  # the engine loop calls it for every step
        for stage, network in (("flow", pipeline.flow), ("hift", pipeline.hift)):
            for method in STAGE_METHODS[stage]:
                if callable(getattr(network, method, None)):
                    fn = counted(stage, getattr(network, method), state)
                    setattr(network, method, timer.wrap(stage, fn))

        def run(command: dict) -> dict:
            replay.tokens = list(command["replay"]) if command.get("replay") else None
            if command.get("new_voice"):  # the voice's prompt flow is computed in this request
                pipeline.prompt_flows.clear()
            state["count"], state["flops"] = command.get("count_flops", False), {}
            timer.reset()
            # the length hook: exactly ``tokens`` speech tokens (the driver checks the audio)
            request = SynthesisRequest(
                Mode.ZERO_SHOT,
                command["text"],
                prompt_audio=command["prompt_wav"],
                prompt_text=command["prompt_text"],
                seed=command["seed"],
                stream=command["stream"],
                max_speech_tokens=command["tokens"],
                ignore_eos=True,
            )
            start = timer.now()
            chunks = ChunkLog(timer, start[0])
            segments = 0
            with rows_in_caller(engine, state["count"]):
                for chunk in engine.synthesize(request):
                    chunks.add(len(chunk.samples))
                    segments = max(segments, chunk.segment + 1)
            timer.add("total", start)
            return {
                **timer.results(),
                "audio_s": sum(c["samples"] for c in chunks.chunks) / engine.sample_rate,
                "sample_rate": engine.sample_rate,
                "segments": segments,
                "tokens": command["tokens"],
                "samples": sum(c["samples"] for c in chunks.chunks),
                "chunks": chunks.chunks,
                "llm_bytes_per_token": llm_bytes,
                "flops": state["flops"],
            }

        return run, load_seconds

    serve(load, import_seconds)


# ----------------------------------------------------------------------------- driver
def ensure_model(model_dir: Path, version: int) -> None:
    needed = (f"cosyvoice{version}.yaml", "llm.pt", "configuration.json")
    generate_model(model_dir, needed, ["--version", str(version), "--no-rl"])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(samples: list[dict]) -> dict:
    """Medians of one kind of request; streaming figures from the chunk logs."""
    keys = [k for k in samples[0] if k.endswith("_s") and k != "audio_s"]
    merged = {k: median([s.get(k, 0.0) for s in samples]) for k in keys}
    steps = [s["llm_step_ms"] for s in samples if "llm_step_ms" in s]
    merged["llm_step_ms"] = median(steps)  # nan where no LLM step was timed (replayed tokens)
    merged["audio_s"] = samples[0]["audio_s"]
    merged["all_total_s"] = [s["total_s"] for s in samples]
    merged["peak_kb"] = max(s["peak_kb"] for s in samples)
    merged["first_chunk_s"] = median([s["chunks"][0]["t"] for s in samples])
    merged["n_chunks"] = len(samples[0]["chunks"])
    merged["chunks"] = samples[len(samples) // 2]["chunks"]  # one run's chunk log, for the record
    return merged


def print_table(results: dict, names: list[str]) -> None:
    from precision_bench import print_floors, ratio_labels, ratios

    meta = results["meta"]
    print()
    print(
        f"CosyVoice{meta['version']} benchmark: {meta['model']} (random weights), zero-shot, CPU, "
        f"{meta['threads']} torch threads, OMP_WAIT_POLICY {meta['omp_wait_policy']}; ours at "
        + ", ".join(f"{n} (dtype {d}, quantize {q})" for n, (d, q) in meta["configs"].items())
        + ("; official at fp32" if "official" in names else "")
        + "; our streams' flow history "
        + (f"bounded at {budget} MiB" if (budget := meta.get("stream_cache_mb")) else "unbounded")
    )
    if meta["repeats"]:
        print(
            f"  median of {meta['repeats']} run(s) after a warm-up; {meta['tokens']} speech tokens per "
            f"request (max_speech_tokens + ignore_eos; audio length checked); prompt {PROMPT_WAV.name}"
        )
    else:
        print(f"  after a warm-up; prompt {PROMPT_WAV.name}")
    labels = ratio_labels(names)
    head = f"{'':<34}" + "".join(f"{n:>11}" for n in names) + "".join(f"{x:>16}" for x in labels)
    print()
    print(head)
    print("-" * len(head))

    def row(label: str, values: list[float], fmt: str) -> None:
        line = f"{label:<34}" + "".join(f"{format(v, fmt):>11}" for v in values)
        line += "".join(
            f"{r:>15.2f}x" for r in ratios(dict(zip(names, values, strict=True)), names)
        )
        print(line)

    def mib(kb: int) -> float:
        return kb / 1024

    row("import, excl. torch (s)", [results[n]["import_s"] for n in names], ".2f")
    row("load (s)", [results[n]["load_s"] for n in names], ".2f")
    row("RSS after load (MiB)", [mib(results[n]["rss_after_load_kb"]) for n in names], ".0f")
    row("peak RSS, load (MiB)", [mib(results[n]["peak_load_kb"]) for n in names], ".0f")
    if all("peak_synth_kb" in results[n] for n in names):
        row("peak RSS, synth (MiB)", [mib(results[n]["peak_synth_kb"]) for n in names], ".0f")
    for kind, label in (
        ("plain", "non-streaming"),
        ("stream", "streaming"),
        ("growth", "replayed stream"),
    ):
        if all(kind in results[n] for n in names):
            row(
                f"  peak RSS, {label} (MiB)",
                [mib(results[n][kind]["peak_kb"]) for n in names],
                ".0f",
            )
    plain = {n: results[n].get("plain") for n in names}
    if all(plain.values()):
        print()
        print(
            f"non-streaming: {meta['tokens']} tokens -> {plain[names[0]]['audio_s']:.2f} s audio"
            + "".join(f"; {n} {plain[n]['audio_s']:.2f} s" for n in names[1:])
        )
        for stage, label in (
            ("llm", "LLM"),
            ("flow", "flow"),
            ("hift", "vocoder"),
            ("total", "total"),
        ):
            row(f"  {label} s", [plain[n][f"{stage}_s"] for n in names], ".2f")
            row(
                f"  {label} RTF",
                [plain[n][f"{stage}_s"] / plain[n]["audio_s"] for n in names],
                ".3f",
            )
            row(f"  {label} CPU s", [plain[n][f"{stage}_cpu_s"] for n in names], ".2f")
    stream = {n: results[n].get("stream") for n in names}
    if all(stream.values()):
        print()
        print(
            f"streaming: {meta['tokens']} tokens -> {stream[names[0]]['audio_s']:.2f} s audio in "
            + ", ".join(f"{n} {stream[n]['n_chunks']} chunks" for n in names)
        )
        row("  first chunk, saved voice (s)", [stream[n]["first_chunk_s"] for n in names], ".2f")
        new_voice = {n: results[n].get("stream_new_voice") for n in names}
        if all(new_voice.values()):
            row(
                "  first chunk, new voice (s)",
                [new_voice[n]["first_chunk_s"] for n in names],
                ".2f",
            )
        row("  total s", [stream[n]["total_s"] for n in names], ".2f")
        row("  total RTF", [stream[n]["total_s"] / stream[n]["audio_s"] for n in names], ".3f")
        row("  LLM s", [stream[n]["llm_s"] for n in names], ".2f")
        row("  flow s", [stream[n]["flow_s"] for n in names], ".2f")
        row("  vocoder s", [stream[n]["hift_s"] for n in names], ".2f")
    growth = {n: results[n].get("growth") for n in names}
    if all(growth.values()):
        print()
        print(
            f"streaming, per chunk, {meta['growth_tokens']} replayed tokens (no LLM work): "
            "flow + vocoder seconds per chunk, and per second of audio in the chunk"
        )
        print(
            f"  {'chunk':<6}{'audio end (s)':>14}"
            + "".join(f"{n + ' s':>12}{n + ' s/s':>14}" for n in names)
        )
        logs = {n: growth[n]["chunks"] for n in names}
        rate = growth[names[0]]["sample_rate"]
        for i in range(max(len(v) for v in logs.values())):
            line, end = f"  {i + 1:<6}", None
            cells = ""
            for n in names:
                if i < len(logs[n]):
                    c = logs[n][i]
                    seconds = c["samples"] / rate
                    end = sum(x["samples"] for x in logs[n][: i + 1]) / rate if end is None else end
                    cells += f"{c['compute_s']:>12.2f}{c['compute_s'] / max(seconds, 1e-9):>14.2f}"
                else:
                    cells += f"{'':>12}{'':>14}"
            print(line + f"{end:>14.2f}" + cells)
        row(
            "  total flow + vocoder s",
            [growth[n]["flow_s"] + growth[n]["hift_s"] for n in names],
            ".2f",
        )
    # the floors always (a --repeats 0 run too); the measured figures beside them where the
    # non-streaming request ran
    view = {
        n: {
            **(plain[n] or {}),
            "llm_bytes_per_token": results[n].get("llm_bytes_per_token"),
            "llm_ms_per_token": (plain[n] or {}).get("llm_step_ms"),
        }
        for n in names
    }
    if all(plain.values()):
        print("\n(floors: the non-streaming request)", end="")
    print_floors(meta["floors"], view, names, meta["tokens"], meta.get("flops", {}))


def drive(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    model_dir = args.model or MODEL_DIRS[args.version]
    ensure_model(model_dir, args.version)
    OUT.mkdir(parents=True, exist_ok=True)
    json_path = args.json or OUT / f"bench_v{args.version}.json"
    threads = args.threads
    growth_tokens = args.growth_tokens
    from precision_bench import check_fixed_length

    floors, configs, names, argv, env = comparison_workers(
        args,
        Path(__file__).resolve(),
        OFFICIAL_WORKER,
        ["--version", str(args.version), "--model", str(model_dir)],
        ("--stream-cache-mb", str(args.stream_cache_mb).lower()),
    )

    transcript = prompt_transcript()
    request = {
        "cmd": "run",
        "text": SENTENCE,
        "prompt_wav": str(PROMPT_WAV),
        "prompt_text": transcript,
        "seed": SEED,
    }
    results: dict = {
        "meta": {
            "version": args.version,
            "model": model_dir.name,
            "threads": threads,
            "repeats": args.repeats,
            "tokens": args.tokens,
            "growth_tokens": growth_tokens,
            "stream_cache_mb": args.stream_cache_mb,
            "warmup_tokens": args.warmup_tokens,
            "omp_wait_policy": args.omp_wait_policy,
            "configs": configs,
            "floors": floors,
            "load_average_start": os.getloadavg(),
            "sentence": SENTENCE,
            "prompt_wav": PROMPT_WAV.name,
            "prompt_text": transcript,
            "seed": SEED,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    }
    workers: dict[str, Worker] = {}
    kinds = ("plain", "stream_new_voice", "stream")  # the new voice primes the saved one
    samples: dict[str, dict[str, list[dict]]] = {n: {k: [] for k in kinds} for n in names}
    growth: dict[str, dict] = {}

    def send(name: str, **overrides) -> dict:
        result = workers[name].send({**request, **overrides})
        # each request resets the worker's high-water mark: the synthesis peak is the largest one
        results[name]["peak_synth_kb"] = max(
            results[name].get("peak_synth_kb", 0), result["peak_kb"]
        )
        samples_out = result.get("samples", round(result["audio_s"] * result["sample_rate"]))
        check_fixed_length(name, overrides["tokens"], samples_out, SAMPLES_PER_TOKEN, 0)
        if result["segments"] != 1:
            raise SystemExit(f"{name}: the sentence became {result['segments']} segments")
        if "llm_bytes_per_token" in result:
            results[name]["llm_bytes_per_token"] = result["llm_bytes_per_token"]
        return result

    def log(name: str, what: str, r: dict) -> None:
        first = f", first chunk {r['chunks'][0]['t']:.2f} s" if len(r["chunks"]) > 1 else ""
        print(
            f"[{name}] {what}: total {r['total_s']:.2f} s (llm {r.get('llm_s', 0):.2f}, flow "
            f"{r.get('flow_s', 0):.2f}, hift {r.get('hift_s', 0):.2f}){first}, audio {r['audio_s']:.2f} s "
            f"in {len(r['chunks'])} chunk(s)",
            flush=True,
        )

    try:
        load_workers(
            workers,
            results,
            names,
            argv,
            env,
            lambda name: OUT / f"bench_v{args.version}_{name}.log",
        )
        for name in names:  # warm-up: a short request (ONNX sessions, allocator, weights paged in)
            log(name, "warm-up", send(name, tokens=args.warmup_tokens, stream=False))
        print("warm-up done (fixed length checked)", flush=True)
        if args.repeats:  # FLOPs of the flow and vocoder for the timed workload (any precision)
            counter = flop_counter(names)
            counted = send(counter, tokens=args.tokens, stream=False, count_flops=True)
            results["meta"]["flops"] = counted["flops"]
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for kind in kinds:
                for name in order:
                    result = send(
                        name,
                        tokens=args.tokens,
                        stream=kind != "plain",
                        new_voice=kind == "stream_new_voice",
                    )
                    samples[name][kind].append(result)
                    log(name, f"{kind} run {rep + 1}/{args.repeats}", result)
        if growth_tokens:
            tokens = replay_tokens(growth_tokens, SEED)
            for name in names:
                growth[name] = send(name, tokens=growth_tokens, stream=True, replay=tokens)
                log(name, f"replayed stream of {growth_tokens} tokens", growth[name])
    finally:
        close_workers(workers, results)
    for name in names:
        for kind in kinds:
            if samples[name][kind]:
                results[name][kind] = summarize(samples[name][kind])
        if name in growth:
            results[name]["growth"] = growth[name]
    results["meta"]["load_average_end"] = os.getloadavg()
    json_path.write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    print_table(results, names)
    print_load_average(results["meta"]["load_average_start"], results["meta"]["load_average_end"])
    print(f"raw figures: {json_path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", type=int, choices=[2, 3], default=2)
    parser.add_argument(
        "--model",
        type=Path,
        help="model directory (default: benchmarks/out/CosyVoice2-0.5B "
        "or Fun-CosyVoice3-0.5B-2512, generated with random weights if absent)",
    )
    # --repeats 0: the replayed stream (--growth-tokens) alone
    add_comparison_args(parser, 2, "timed runs per kind and implementation", least_repeats=0)
    parser.add_argument("--tokens", type=int, default=100, help="speech tokens decoded per request")
    parser.add_argument(
        "--warmup-tokens",
        type=int,
        default=10,
        help="speech tokens of the (non-streaming) warm-up request",
    )
    parser.add_argument(
        "--growth-tokens",
        type=int,
        default=0,
        help="replayed tokens of the per-chunk streaming run (default 0: off; e.g. 300 "
        "with --repeats 0 for that run alone)",
    )
    parser.add_argument(
        "--stream-cache-mb",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=STREAM_CACHE_MB,
        help=f"our streams' flow history bound, MiB (default {STREAM_CACHE_MB}, the product's; "
        "none: unbounded, as the figures before 2026-12-05 evening)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the raw figures (default benchmarks/out/bench_v<version>.json)",
    )
    run_benchmark(parser, our_worker, drive)


if __name__ == "__main__":
    main()
