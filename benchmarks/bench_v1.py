"""Speed benchmark of CosyVoice v1 (CosyVoice-300M-SFT, preset voice): cosyvoice-lite vs the official code.

    .venv/bin/python benchmarks/bench_v1.py
    .venv/bin/python benchmarks/bench_v1.py --official-python /tmp/refenv/bin/python \\
        --official-path /tmp/refshim:/tmp/official/CosyVoice:/tmp/official/Matcha-TTS

(or set COSYVOICE_OFFICIAL_PYTHON / COSYVOICE_OFFICIAL_PATH). The full-size random-weight model
directory is generated with tools/make_models.py on first use (benchmarks/out/, git-ignored).

Each implementation runs in its own worker process (so the peak-memory figures do not mix): this
file with ``--worker`` for ours, benchmarks/official_v1.py for the official ``CosyVoice`` class.
The workers load the model once, then this driver sends them the same requests in alternation
(ours, official, official, ours, ...) so that drifting machine load hits both alike.

Random weights would stop the LLM at a random point, so every request decodes a fixed number of
speech tokens: the sampler of each implementation is wrapped so that it never picks the stop token
before N tokens and picks it at N. Stage times come from wrapping the three networks' entry points
(LLM token generator, ``flow.inference``, ``hift.inference``) with timers; "total" is the whole
request, text frontend included. This file imports only the standard library at the top, so the
official worker can reuse its helpers from another Python environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODEL_DIR = OUT / "CosyVoice-300M-SFT"
RESULTS = OUT / "bench_v1.json"
OFFICIAL_WORKER = ROOT / "benchmarks" / "official_v1.py"
PREFIX = "@@bench "  # protocol lines on a worker's stdout; everything else there is log noise

# The fixed workload: a 40-character Chinese sentence and an English sentence of similar length,
# both short enough to stay one text segment in both frontends.
SENTENCES = {
    "zh": "今天天气晴朗，我们一起去公园散步，看看湖边盛开的美丽花朵和天空中自由飞翔的小鸟。",
    "en": "The quick brown fox jumps over the lazy dog, while the children watch it from the garden.",
}
VOICES = {"zh": "中文女", "en": "英文女"}
SEED = 1986


# ----------------------------------------------------------------------------- shared by workers
class FixedLength:
    """Wrap a sampler ``(scores, decoded, *extra) -> id`` so that decoding yields exactly ``n``
    tokens: the stop token is masked out before ``n`` and chosen at ``n``. Works for both our
    ``RasSampler`` and the official ``llm.sampling`` (``ras_sampling(scores, decoded, top_k)``)."""

    def __init__(self, sampler: Callable, stop_token: int, n: int) -> None:
        self.sampler, self.stop_token, self.n = sampler, stop_token, n

    def __call__(self, scores, decoded, *extra):
        if len(decoded) >= self.n:
            return self.stop_token
        scores[self.stop_token] = -float("inf")
        return self.sampler(scores, decoded, *extra)


class StageTimer:
    """Accumulates wall time and process CPU time per stage; wraps functions and token generators.

    The CPU time is the whole process's (all threads): stages never overlap in a non-streaming
    request, and on a busy machine it is steadier than the wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, list[float]] = {}
        self._inside = threading.local()  # stages this thread is timing now

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    def add(self, stage: str, start: tuple[float, float]) -> None:
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        self.seconds[f"{stage}_s"] = self.seconds.get(f"{stage}_s", 0.0) + wall
        self.seconds[f"{stage}_cpu_s"] = self.seconds.get(f"{stage}_cpu_s", 0.0) + cpu
        self.calls.setdefault(stage, []).append(wall)

    def results(self) -> dict[str, float]:
        """The summed seconds plus ``llm_step_ms``: the median LLM call after the first (the
        first feeds the prompt; every later one decodes one token), as the issue defines it."""
        steps = sorted(self.calls.get("llm", [])[1:])
        extra = {"llm_step_ms": 1e3 * steps[len(steps) // 2]} if steps else {}
        return {**self.seconds, **extra}

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def wrap(self, stage: str, fn: Callable) -> Callable:
        """``fn`` timed as ``stage``. Only the outermost timed call of a stage counts: a wrapped
        entry point may call another (our v2 vocoder's ``stream_step`` calls its ``inference``)."""

        def timed(*args, **kwargs):
            with outermost(self._inside, stage) as outer:
                if not outer:
                    return fn(*args, **kwargs)
                start = self.now()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.add(stage, start)

        return timed

    def iterate(self, stage: str, items) -> Iterator:
        """Time every ``next()`` of a (lazy) generator: the LLM works inside those calls."""
        items = iter(items)
        while True:
            start = self.now()
            try:
                item = next(items)
            except StopIteration:
                self.add(stage, start)
                return
            self.add(stage, start)
            yield item


def memory_kb() -> dict[str, int]:
    """Current and peak resident set size (Linux /proc; ru_maxrss elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_kb": int(fields["VmRSS"].split()[0]),
            "hwm_kb": int(fields["VmHWM"].split()[0]),
        }
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rss_kb": peak, "hwm_kb": peak}


def reset_peak_memory() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0), so the synthesis peak is
    measured apart from the loading peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def add_official_worker_args(parser: argparse.ArgumentParser) -> None:
    """The options the official workers (official_v1.py, official_v2v3.py) take from the driver."""
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument(
        "--wetext-fsts",
        default="",
        help="local wetext FSTs ({zh,en}/tn/*.fst): wetext 0.0.4 would download them",
    )


def offline_wetext(fsts: str) -> None:
    """Point wetext at local FSTs, where it is importable: 0.0.4 fetches them from ModelScope
    when the official frontend is built, and a benchmark must not download."""
    if not fsts:
        return
    try:
        import wetext.wetext
    except ImportError:
        return
    if hasattr(wetext.wetext, "snapshot_download"):
        wetext.wetext.snapshot_download = lambda *a, **k: fsts


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def emit(payload: dict) -> None:
    sys.__stdout__.write(PREFIX + json.dumps(payload, ensure_ascii=False) + "\n")
    sys.__stdout__.flush()


def release_free_memory() -> None:
    """Hand memory freed by earlier requests back to the OS (glibc ``malloc_trim``), so that a
    request's peak RSS is not inflated by what the allocator kept from the request before."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def serve(load: Callable[[], tuple[Callable[[dict], dict], float]], import_seconds: float) -> None:
    """Worker main loop: ``load()`` returns ``(run, load_seconds)``; ``run(command) -> dict``."""
    sys.stdout = sys.stderr  # keep stdout for the protocol
    run, load_seconds = load()
    ready = {"event": "ready", "import_s": import_seconds, "load_s": load_seconds, **memory_kb()}
    ready["peak_reset"] = reset_peak_memory()
    emit(ready)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            emit({"event": "bye", **memory_kb()})
            return
        release_free_memory()
        reset_peak_memory()  # the peak of this request alone (resident model included)
        try:
            result = run(command)
        except Exception as exc:  # report it to the driver instead of dying silently
            emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
            raise
        emit({"event": "result", **result, "peak_kb": memory_kb()["hwm_kb"]})


# ----------------------------------------------------------------------------- our worker
_COUNTING = threading.local()  # stages whose FLOPs this thread is counting now


@contextlib.contextmanager
def outermost(inside: threading.local, stage: str) -> Iterator[bool]:
    """Whether this is the outermost call of ``stage`` in this thread (nested calls must not
    count twice), marking the stage as entered until the block ends."""
    active = inside.__dict__.setdefault("stages", set())
    if stage in active:
        yield False
        return
    active.add(stage)
    try:
        yield True
    finally:
        active.discard(stage)


def counted(stage: str, fn: Callable, state: dict) -> Callable:
    """``fn`` that adds its FLOPs (torch's FlopCounterMode) to ``state["flops"][stage]`` while
    ``state["count"]`` is set: the flow's floor is its FLOPs over the machine's matmul rate.
    Only the outermost counted call of a stage counts, as in ``StageTimer.wrap``."""

    def call(*args, **kwargs):
        if not state.get("count"):
            return fn(*args, **kwargs)
        with outermost(_COUNTING, stage) as outer:
            if not outer:
                return fn(*args, **kwargs)
            with thread_flop_counter() as counter:
                out = fn(*args, **kwargs)
        state["flops"][stage] = state["flops"].get(stage, 0) + counter.get_total_flops()
        return out

    return call


def thread_flop_counter():  # noqa: ANN201 - torch's FlopCounterMode
    """torch's FlopCounterMode with ``packed_flops``, for the calling thread only. Its dispatch
    mode is per thread, but its module tracker hooks every module's forward in the process, and
    those hooks fail in the engine's other threads (a decoding step beside a counted flow call);
    the total needs no per-module breakdown, so the tracker is left out."""
    from torch.utils.flop_counter import FlopCounterMode

    class NoModules:
        parents = ("Global",)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *args: object) -> None:
            return None

    counter = FlopCounterMode(display=False, custom_mapping=packed_flops())
    counter.mod_tracker = NoModules()
    return counter


def packed_flops() -> dict:
    """FlopCounterMode's formulas for two CPU kernels it does not know. oneDNN's packed linear
    product (precision.PackedLinear): 2 * out elements * in features, counting the rows as
    computed, padding included (precision.padded_rows: ~3.5% more on average, at most 12.5%), so
    the flow's count (and floor) is a few percent above the official's own products. torch's CPU
    attention kernel: the formula torch gives its GPU attention kernels (the two products; masked
    scores are computed too)."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def linear_pointwise(x_shape, *args, out_shape, **kwargs) -> int:
        return 2 * math.prod(out_shape) * x_shape[-1]

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {
        torch.ops.mkldnn._linear_pointwise: linear_pointwise,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
    }


# The networks' entry points the v1 pipeline calls (a whole utterance too goes through the
# streaming contract, ``stream_step`` with ``finalize``); nested calls count once (outermost).
STAGE_METHODS = {
    "flow": ("inference", "stream_step"),
    "hift": ("inference", "stream_step", "stream_steps"),
}


def flop_counter(names: list[str]) -> str:
    """The config whose run counts the FLOPs (the same in every precision): fp32 (its flow's
    products are the ones FlopCounterMode knows, with ``packed_flops``)."""
    return "fp32" if "fp32" in names else names[0]


@contextlib.contextmanager
def rows_in_caller(engine, active: bool) -> Iterator[None]:
    """While ``active`` (the FLOP-counting request), the flow's rows are computed in the thread
    that calls the flow, not on the row threads a CPU engine uses (row_parallel.py): torch's
    FlopCounterMode sees its own thread only. The same products, so the same FLOPs."""
    from cosyvoice_lite.row_parallel import SERIAL

    decoder = engine.pipeline.flow.decoder
    saved = decoder.stream_rows, decoder.utterance_rows
    if active:
        decoder.stream_rows = decoder.utterance_rows = SERIAL
    try:
        yield
    finally:
        decoder.stream_rows, decoder.utterance_rows = saved


def instrument(engine, timer: StageTimer, state: dict) -> None:
    """Time the LLM steps (``log_probs``, called by the engine loop for every decoding step and
    prefill) and the flow / vocoder entry points of the loaded networks; count FLOPs on demand."""
    pipeline = engine.pipeline
    pipeline.llm.log_probs = timer.wrap("llm", pipeline.llm.log_probs)
    for stage, network in (("flow", pipeline.flow), ("hift", pipeline.hift)):
        for method in STAGE_METHODS[stage]:
            if callable(getattr(network, method, None)):
                fn = counted(stage, getattr(network, method), state)
                setattr(network, method, timer.wrap(stage, fn))


def our_worker(
    model_dir: Path, threads: int, dtype: str = "float32", quantize: str | None = None
) -> None:
    set_threads(threads)
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from precision_bench import llm_bytes_per_token

    from cosyvoice_lite.engine import Engine
    from cosyvoice_lite.request import Mode, SynthesisRequest

    import_seconds = time.perf_counter() - start

    def load():
        start = time.perf_counter()
        engine = Engine.load(
            model_dir, device="cpu", dtype=dtype, quantize=quantize, share_onnx_threads=True
        )
        load_seconds = time.perf_counter() - start
        timer, state = StageTimer(), {"flops": {}}
        instrument(engine, timer, state)
        llm_bytes = llm_bytes_per_token(engine.pipeline.llm)

        def run(command: dict) -> dict:
            text, voice, tokens, seed = (command[k] for k in ("text", "voice", "tokens", "seed"))
            count_flops = command.get("count_flops", False)
            timer.reset()
            state["count"], state["flops"] = count_flops, {}
            # the length hook: exactly ``tokens`` speech tokens (the driver checks the audio)
            request = SynthesisRequest(
                Mode.PRESET, text, voice=voice, seed=seed, max_speech_tokens=tokens, ignore_eos=True
            )
            start = timer.now()
            segments = samples = 0
            with rows_in_caller(engine, count_flops):
                for chunk in engine.synthesize(request):
                    samples += len(chunk.samples)
                    segments = max(segments, chunk.segment + 1)
            timer.add("total", start)
            timed = timer.results()
            untimed = [stage for stage in ("llm", "flow", "hift") if f"{stage}_s" not in timed]
            if untimed:  # an entry point renamed: the stage's time would read 0
                raise RuntimeError(f"stages never timed: {untimed} (see STAGE_METHODS)")
            return {
                **timed,
                "audio_s": samples / engine.sample_rate,
                "segments": segments,
                "tokens": tokens,
                "samples": samples,
                "llm_bytes_per_token": llm_bytes,
                "flops": state["flops"],
            }

        return run, load_seconds

    serve(load, import_seconds)


# ----------------------------------------------------------------------------- driver
class Worker:
    """A worker process speaking the line protocol."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path | None = None
    ) -> None:
        self.name = name
        # the worker's own logging and progress bars
        self.log = log or OUT / f"bench_v1_{name}.log"
        with self.log.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
                encoding="utf-8",
                cwd=ROOT,
            )

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                message = json.loads(line[len(PREFIX) :])
                if message["event"] == "error":
                    raise SystemExit(
                        f"{self.name} worker failed: {message['error']} (log: {self.log})"
                    )
                return message
        tail = "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise SystemExit(
            f"{self.name} worker exited (code {self.process.wait()}); end of {self.log}:\n{tail}"
        )

    def send(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command, ensure_ascii=False) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> dict:
        bye = self.send({"cmd": "quit"})
        self.process.wait()
        return bye


def generate_model(model_dir: Path, needed: tuple[str, ...], options: list[str]) -> None:
    """Generate a full-size random-weight model (tools/make_models.py ``options``) in
    ``model_dir`` unless it holds the ``needed`` files. Only a missing or empty directory is
    written: one with other files may be a real model (a downloaded CosyVoice-300M base, a
    CosyVoice3 directory named by mistake), whose weights must not become random ones."""
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if not missing:
        return
    if model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise SystemExit(
            f"{model_dir} exists but has no {', '.join(missing)}: not the model this benchmark "
            "runs, and not overwritten. Name such a model directory, or a new or empty one to "
            "generate random weights in (an interrupted generation's leftover: delete it first)"
        )
    print(f"generating the full-size random-weight model in {model_dir} ...", flush=True)
    command = [sys.executable, str(ROOT / "tools" / "make_models.py"), *options]
    subprocess.run([*command, "--size", "full", "--out", str(model_dir)], check=True)


def ensure_model(model_dir: Path) -> None:
    generate_model(
        model_dir,
        ("cosyvoice.yaml", "llm.pt", "spk2info.pt"),
        ["--version", "1", "--variant", "sft"],
    )


def worker_env(threads: int, wait_policy: str, pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.pop("GOMP_SPINCOUNT", None)
    if wait_policy == "spin":  # a short spin, then sleep (faster on a dedicated machine)
        env.pop("OMP_WAIT_POLICY", None)
        env["GOMP_SPINCOUNT"] = "10000"
    elif wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
    return env


def check_src(src: Path) -> None:
    """``src`` must be a checkout's ``src`` directory: anything else leaves the installed package
    to be imported, and an ours-vs-baseline run compares ours with ours."""
    if not (src / "cosyvoice_lite" / "__init__.py").is_file():
        raise SystemExit(f"{src} holds no cosyvoice_lite package: name a checkout's src directory")


def src_env(src: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``src`` first on PYTHONPATH, ahead of the installed package."""
    path = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path}


def run_src_worker(name: str, argv: list[str], env: dict[str, str], src: Path) -> dict:
    """Run a worker that prints one JSON line with ``source`` (its ``cosyvoice_lite.__file__``);
    its result, once checked to come from the code under ``src``. A failed worker's error (a
    FIXED LENGTH NOT APPLIED among them) ends the run with the end of its stderr."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(
            f"the {name} worker failed (exit code {done.returncode}):\n{done.stderr[-3000:]}"
        )
    result = json.loads(lines[-1])
    source = Path(result.pop("source"))
    if not source.resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"the {name} worker imported {source}, not the code under {src}")
    return result


def official_available(python: str, env: dict[str, str]) -> str | None:
    """None when the official CosyVoice class imports in that environment, else the reason."""
    probe = subprocess.run(
        [python, "-c", "import cosyvoice.cli.cosyvoice"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return None
    lines = (probe.stderr or probe.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {probe.returncode}"


def comparison_workers(
    args: argparse.Namespace,
    script: Path,
    official_script: Path,
    model_args: list[str],
    our_args: tuple[str, ...] = (),
) -> tuple[dict, dict, list[str], dict[str, list[str]], dict[str, dict[str, str]]]:
    """What an ours-vs-official benchmark (bench_v1, bench_v2v3) runs, as its driver sets it up:
    this run's floors, our precisions that suit this CPU (``--configs``), and for each worker
    its name, command line and environment. ``model_args`` name the model to both workers,
    ``our_args`` are our worker's own options. The official comes last, where it is configured
    (``--official-python``/``--official-path`` or their environment variables) and imports;
    otherwise the run benchmarks ours only and says why."""
    from precision_bench import configs as machine_configs
    from precision_bench import measure_floors

    threads = args.threads
    print("measuring the floors ...", flush=True)
    floors = measure_floors(threads)  # they say which configs suit this CPU too
    configs = machine_configs(args.configs, floors)
    names = list(configs)
    argv, env = {}, {}
    for name, (dtype, quantize) in configs.items():
        argv[name] = [
            sys.executable, str(script), "--worker", *model_args, "--threads", str(threads),
            "--dtype", dtype, *(["--quantize", quantize] if quantize else []), *our_args,
        ]  # fmt: skip
        env[name] = worker_env(threads, args.omp_wait_policy)
    official_python = args.official_python or os.environ.get("COSYVOICE_OFFICIAL_PYTHON")
    official_path = args.official_path or os.environ.get("COSYVOICE_OFFICIAL_PATH")
    if not (official_python or official_path):
        print(
            "official implementation not configured (--official-python/--official-path); "
            "benchmarking ours only"
        )
        return floors, configs, names, argv, env
    python = official_python or sys.executable
    official_env = worker_env(threads, args.omp_wait_policy, official_path)
    reason = official_available(python, official_env)
    if reason is not None:
        print(f"official implementation not importable with {python}: {reason}; ours only")
        return floors, configs, names, argv, env
    names.append("official")
    argv["official"] = [
        python, str(official_script), *model_args, "--threads", str(threads),
        "--wetext-fsts", args.wetext_fsts,
    ]  # fmt: skip
    env["official"] = official_env
    return floors, configs, names, argv, env


def load_workers(
    workers: dict[str, Worker],
    results: dict,
    names: list[str],
    argv: dict[str, list[str]],
    env: dict[str, dict[str, str]],
    log: Callable[[str], Path | None] = lambda name: None,
) -> None:
    """Start the workers one at a time (loading is CPU-heavy and must not overlap), each added
    to ``workers`` as it starts (for the caller's clean-up), its load figures to ``results``."""
    for name in names:
        print(f"[{name}] loading ...", flush=True)
        workers[name] = Worker(name, argv[name], env[name], log(name))
        ready = workers[name].receive()
        results[name] = {
            "import_s": ready["import_s"],
            "load_s": ready["load_s"],
            "rss_after_load_kb": ready["rss_kb"],
            "peak_load_kb": ready["hwm_kb"],
            "peak_reset": ready["peak_reset"],
        }
        print(f"[{name}] loaded in {ready['load_s']:.1f} s", flush=True)


def close_workers(workers: dict[str, Worker], results: dict) -> None:
    """Stop the workers still running; each one's goodbye carries the process's memory peak,
    kept in ``results`` where it is larger than the peak of every request."""
    for name, worker in workers.items():
        if worker.process.poll() is None:
            try:
                bye = worker.close()["hwm_kb"]
                peaks = results.setdefault(name, {})
                peaks["peak_synth_kb"] = max(peaks.get("peak_synth_kb", 0), bye)
            except (SystemExit, OSError, BrokenPipeError):
                worker.process.kill()


def print_load_average(start: tuple[float, ...], end: tuple[float, ...]) -> None:
    print(
        f"\nmachine load average (1/5/15 min) at start: {start[0]:.2f} {start[1]:.2f} "
        f"{start[2]:.2f}; at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} "
        f"(on {os.cpu_count()} cores)"
    )


def default_wetext_fsts() -> str:
    """The wetext FSTs bundled with the project's wetext, for the official frontend (whose wetext
    0.0.4 would otherwise download them from ModelScope)."""
    import importlib.util

    spec = importlib.util.find_spec("wetext")
    if spec is None or spec.origin is None:
        return ""
    fsts = Path(spec.origin).parent / "fsts"
    return str(fsts) if fsts.is_dir() else ""


def mib(kb: int) -> float:
    return kb / 1024


def print_table(results: dict, names: list[str]) -> None:
    from precision_bench import print_floors, ratio_labels, ratios

    meta = results["meta"]
    print()
    print(
        f"CosyVoice v1 benchmark: {meta['model']} (random weights), CPU, {meta['threads']} torch "
        f"threads, OMP_WAIT_POLICY {meta['omp_wait_policy']}; ours at "
        + ", ".join(f"{n} (dtype {d}, quantize {q})" for n, (d, q) in meta["configs"].items())
        + ("; official at fp32" if "official" in names else "")
    )
    print(
        f"  median of {meta['repeats']} runs after a warm-up; fixed speech tokens per request: "
        + ", ".join(f"{k} {v}" for k, v in meta["tokens"].items())
        + " (max_speech_tokens + ignore_eos; audio length checked)"
    )
    labels = ratio_labels(names)
    head = f"{'':<24}" + "".join(f"{n:>11}" for n in names) + "".join(f"{x:>16}" for x in labels)
    print()
    print(head)
    print("-" * len(head))

    def row(label: str, values: list[float], fmt: str) -> None:
        line = f"{label:<24}" + "".join(f"{format(v, fmt):>11}" for v in values)
        line += "".join(
            f"{r:>15.2f}x" for r in ratios(dict(zip(names, values, strict=True)), names)
        )
        print(line)

    row("import, excl. torch (s)", [results[n]["import_s"] for n in names], ".2f")
    row("load (s)", [results[n]["load_s"] for n in names], ".2f")
    row("RSS after load (MiB)", [mib(results[n]["rss_after_load_kb"]) for n in names], ".0f")
    row("peak RSS, load (MiB)", [mib(results[n]["peak_load_kb"]) for n in names], ".0f")
    row("peak RSS, synth (MiB)", [mib(results[n]["peak_synth_kb"]) for n in names], ".0f")
    for key in meta["tokens"]:
        runs = {n: results[n]["runs"][key] for n in names}
        audio = runs[names[0]]["audio_s"]
        print()
        print(
            f"{key}: {meta['tokens'][key]} tokens -> {audio:.2f} s audio"
            + "".join(f"; {n} {runs[n]['audio_s']:.2f} s" for n in names[1:])
        )
        for stage, label in (
            ("llm", "LLM"),
            ("flow", "flow"),
            ("hift", "vocoder"),
            ("total", "total"),
        ):
            row(f"  {label} s", [runs[n][f"{stage}_s"] for n in names], ".2f")
            row(
                f"  {label} RTF", [runs[n][f"{stage}_s"] / runs[n]["audio_s"] for n in names], ".3f"
            )
            row(f"  {label} CPU s", [runs[n][f"{stage}_cpu_s"] for n in names], ".2f")
    key = next(iter(meta["tokens"]))
    floor_view = {
        n: {
            **results[n]["runs"][key],
            "llm_bytes_per_token": results[n]["runs"][key].get("llm_bytes_per_token"),
            "llm_ms_per_token": results[n]["runs"][key]["llm_step_ms"],
        }
        for n in names
    }
    print(f"\n(floors: the {key} request)", end="")
    print_floors(meta["floors"], floor_view, names, meta["tokens"][key], meta.get("flops", {}))


def median_runs(samples: list[dict]) -> dict:
    keys = [k for k in samples[0] if k.endswith(("_s", "_ms"))]  # seconds, llm_step_ms
    merged = {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}
    merged["audio_s"] = samples[0]["audio_s"]
    merged["all_total_s"] = [s["total_s"] for s in samples]
    merged["segments"] = samples[0]["segments"]
    merged["llm_bytes_per_token"] = samples[0].get("llm_bytes_per_token")
    return merged


SAMPLES_PER_TOKEN = 22050 / 50  # v1: 50 speech tokens per second at 22.05 kHz
LENGTH_TOLERANCE = 256  # the flow rounds the mel length down to whole 256-sample frames


def drive(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from precision_bench import check_fixed_length

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    ensure_model(args.model)
    OUT.mkdir(parents=True, exist_ok=True)
    threads = args.threads
    floors, configs, names, argv, env = comparison_workers(
        args, Path(__file__).resolve(), OFFICIAL_WORKER, ["--model", str(args.model)]
    )

    tokens = {"zh": args.tokens_zh, "en": args.tokens_en}
    results: dict = {
        "meta": {
            "model": args.model.name,
            "threads": threads,
            "repeats": args.repeats,
            "omp_wait_policy": args.omp_wait_policy,
            "configs": configs,
            "floors": floors,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "warmup_tokens": args.warmup_tokens,
            "tokens": tokens,
            "sentences": SENTENCES,
            "voices": VOICES,
            "seed": SEED,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    }
    workers: dict[str, Worker] = {}
    samples: dict[str, dict[str, list[dict]]] = {n: {k: [] for k in tokens} for n in names}

    def send(name: str, key: str, n_tokens: int, **options) -> dict:
        command = {
            "cmd": "run",
            "text": SENTENCES[key],
            "voice": VOICES[key],
            "tokens": n_tokens,
            "seed": SEED,
        }
        result = workers[name].send({**command, **options})
        # each request resets the worker's high-water mark: the synthesis peak is the largest one
        peaks = results[name]
        peaks["peak_synth_kb"] = max(peaks.get("peak_synth_kb", 0), result["peak_kb"])
        samples_out = result.get("samples", round(result["audio_s"] * 22050))
        check_fixed_length(name, n_tokens, samples_out, SAMPLES_PER_TOKEN, LENGTH_TOLERANCE)
        if result["segments"] != 1:
            raise SystemExit(f"{name}: the {key} sentence became {result['segments']} segments")
        return result

    try:
        load_workers(workers, results, names, argv, env)
        for key in tokens:  # warm-up: every code path once, on a shorter decode
            for name in names:
                send(name, key, args.warmup_tokens)
        print("warm-up done (fixed length checked)", flush=True)
        key = next(iter(tokens))
        counter = flop_counter(names)
        results["meta"]["flops"] = send(counter, key, tokens[key], count_flops=True)["flops"]
        for rep in range(args.repeats):
            order = names if rep % 2 == 0 else names[::-1]
            for key in tokens:
                for name in order:
                    result = send(name, key, tokens[key])
                    samples[name][key].append(result)
                    print(
                        f"[{name}] {key} run {rep + 1}/{args.repeats}: total {result['total_s']:.2f} s "
                        f"(llm {result.get('llm_s', 0):.2f}, flow {result.get('flow_s', 0):.2f}, "
                        f"hift {result.get('hift_s', 0):.2f}), audio {result['audio_s']:.2f} s",
                        flush=True,
                    )
    finally:
        close_workers(workers, results)
    for name in names:
        results[name]["runs"] = {k: median_runs(v) for k, v in samples[name].items()}
    args.json.write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    print_table(results, names)
    if results["meta"]["load_average"] is not None:
        print_load_average(results["meta"]["load_average"], os.getloadavg())
    print(f"raw figures: {args.json}")


def config_names(value: str) -> str:
    """--configs, checked when parsed: an unknown name failed only after the floors were measured."""
    from precision_bench import CONFIGS

    unknown = [name for name in value.split(",") if name not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(map(repr, unknown))}: use {', '.join(CONFIGS)}"
        )
    return value


def count_from(least: int) -> Callable[[str], int]:
    """An int option of at least ``least``, checked when parsed (not once the workers loaded)."""

    def parse(value: str) -> int:
        number = int(value)
        if number < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {number}")
        return number

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def add_comparison_args(
    parser: argparse.ArgumentParser, repeats: int, repeats_help: str, least_repeats: int = 1
) -> None:
    """The options every ours-vs-official benchmark shares (bench_v1, bench_v2v3): the official
    environment, threads and wait policy, repeats (at least ``least_repeats``), our precisions,
    and the hidden worker mode."""
    parser.add_argument(
        "--official-python",
        help="Python of an environment where the official code "
        "runs (env COSYVOICE_OFFICIAL_PYTHON)",
    )
    parser.add_argument(
        "--official-path",
        help="PYTHONPATH entries (os.pathsep-separated) that make the "
        "official CosyVoice and Matcha-TTS importable (env COSYVOICE_OFFICIAL_PATH)",
    )
    parser.add_argument(
        "--wetext-fsts",
        default=default_wetext_fsts(),
        help="local wetext FST directory for the official frontend (default: the "
        "project's wetext package)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads, the same for both implementations (default: all cores)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "spin", "active", "default"],
        default="passive",
        help="OpenMP wait policy of both workers (default passive: on a busy machine, "
        "OpenMP's default spinning slows down compute in the main thread, which is where "
        "ours runs the LLM, by an order of magnitude; the official runs it in a "
        "Python thread, which is barely affected; spin: GOMP_SPINCOUNT=10000, faster on "
        "a dedicated machine, slower on a busy one, see bench_wait_policy.py)",
    )
    parser.add_argument(
        "--repeats", type=count_from(least_repeats), default=repeats, help=repeats_help
    )
    parser.add_argument(
        "--configs",
        type=config_names,
        default="fp32,bf16,int8",
        help="our precisions to run, from fp32, bf16, int8 (int8 LLM layers, the flow and "
        "vocoder in bf16, or in fp32 on a CPU without bf16 instructions)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default=None, help=argparse.SUPPRESS)


def run_benchmark(parser: argparse.ArgumentParser, worker: Callable, driver: Callable) -> None:
    """Parse the options; run our worker (``--worker``, started by the driver) or the driver."""
    args = parser.parse_args()
    if args.worker:
        # a benchmark's own load options (bench_v2v3: --stream-cache-mb) go to its worker
        extra = {"stream_cache_mb": args.stream_cache_mb} if "stream_cache_mb" in args else {}
        worker(args.model, args.threads, args.dtype, args.quantize, **extra)
    else:
        driver(args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=MODEL_DIR,
        help="CosyVoice-300M-SFT directory (generated with random weights if absent)",
    )
    add_comparison_args(parser, 3, "timed runs per sentence and implementation")
    parser.add_argument(
        "--tokens-zh", type=int, default=200, help="speech tokens decoded for the zh sentence"
    )
    parser.add_argument(
        "--tokens-en", type=int, default=200, help="speech tokens decoded for the en sentence"
    )
    parser.add_argument(
        "--warmup-tokens", type=int, default=50, help="speech tokens of the warm-up runs"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the raw figures")
    run_benchmark(parser, our_worker, drive)


if __name__ == "__main__":
    main()
