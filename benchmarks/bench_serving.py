"""Serving benchmark: the real HTTP server on a full-size random-weight model, driven at several
concurrencies, against the previous one-thread-per-request design, in the same run.

    .venv/bin/python benchmarks/bench_serving.py --model-dir /tmp/models-full/v2 \
        --tokens 50 --concurrency 1,2,4,8 --transports whole,stream

For each design (``loop``: the engine loop that decodes every request together; ``threads``: the
previous design, each request computed alone in its own thread, all competing for the cores;
``loop-rows-alone``: the loop with every flow estimator row computed alone on the threads, as
before 2026-12-05 noon, where the engine now gives each thread one share of the rows;
``loop-wide``: the loop with every flow call on all the row threads, as before 2026-12-05
afternoon, where a call computed while the LLM decodes now takes half of them) a
server process is started (uvicorn, loopback), warmed up, then for each transport and concurrency
c, c requests are sent at once (one connection each, different seeds). Printed per level:
aggregate audio seconds per wall second, the speed-up over c=1, p50/p95 time to the first audio
byte, p50/p95 request latency, the server's peak RSS during the level and the peak above the
loaded model per concurrent request; then the loop's ratios to the other designs, the load
average and the floors.

Random weights rarely emit eos, so every request decodes exactly ``--tokens`` speech tokens
(``SynthesisRequest.max_speech_tokens`` + ``ignore_eos``, set by the server process below); the
benchmark fails loudly if any response's duration is not that length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: no spinning OpenMP threads

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ROOT / "tests" / "data" / "audio" / "zh_16k.wav"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXTS = {1: "今天天气很好，我们一起去公园散步吧。", 2: "今天天气很好，我们一起去公园散步吧。"}


# ---------------------------------------------------------------------------------- server side
class FixedLength:
    """The engine with every request decoding exactly ``tokens`` speech tokens (random weights)."""

    def __init__(self, engine, tokens: int) -> None:
        self._engine, self.tokens = engine, tokens

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def fixed(self, request):
        return dataclasses.replace(request, max_speech_tokens=self.tokens, ignore_eos=True)

    def submit(self, request, sink, progress=None, prompt=None):
        return self._engine.submit(self.fixed(request), sink, progress, prompt)


class _Cancel:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class PerRequestThreads(FixedLength):
    """The previous design: each request computed alone (batch of one) in its own thread."""

    def submit(self, request, sink, progress=None, prompt=None):
        import torch

        from cosyvoice_lite.decoding import run_alone

        engine, request, job = self._engine, self.fixed(request), _Cancel()
        engine._check(request)

        def work() -> None:
            try:
                with torch.inference_mode():
                    run = engine._prepare(request, progress, prompt, sink)
                    pipeline, last = engine.pipeline, len(run.segments) - 1
                    for index in range(len(run.segments)):
                        task, audio = run.start_segment(index)
                        for token in run_alone(pipeline.llm, task):
                            if job.cancelled.is_set():
                                sink.end(None)
                                return
                            piece = audio.push(token)
                            if piece is not None:
                                run.emit(piece, index, False)
                        run.emit(audio.finish(), index, index == last)
            except Exception as exc:  # noqa: BLE001 - handed to the server
                sink.end(exc)
                return
            sink.end(None)

        threading.Thread(target=work, daemon=True).start()
        return job


def serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from cosyvoice_lite.engine import Engine
    from cosyvoice_lite.serving import Settings, create_app

    torch.set_num_threads(args.threads)
    engine = Engine.load(
        args.model_dir,
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch=args.max_batch,
        audio_workers=args.audio_workers,
        flow_threads_while_decoding=args.threads if args.design == "loop-wide" else None,
        share_onnx_threads=True,  # as the server loads
    )
    if args.design == "loop-rows-alone":
        from cosyvoice_lite.row_parallel import RowSplit

        flow = engine.pipeline.flow.decoder
        if args.threads < 2 or not flow.stream_rows.shares:
            raise SystemExit("loop-rows-alone: the engine's flow rows are not in shares here")
        flow.close_row_split()
        flow.set_row_split(RowSplit(args.threads))
    design = PerRequestThreads if args.design == "threads" else FixedLength
    wrapped = design(engine, args.tokens)
    settings = Settings(
        workers=args.max_batch,
        max_queue=64,
        request_timeout=7200,
        voices_dir=Path(tempfile.mkdtemp()),
        log_requests=False,
    )
    uvicorn.run(
        create_app(wrapped, settings), host="127.0.0.1", port=args.port, log_level="warning"
    )


# ---------------------------------------------------------------------------------- driver side
def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_until_ready(process: subprocess.Popen, client, what: str, log: Path) -> None:
    """Wait until a started server's ``/ready`` answers 200 (at most 10 minutes); a server that
    exits or does not get ready is stopped and the run fails, naming its log."""
    import httpx

    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{what} did not start; see {log}")
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


class Server:
    def __init__(self, args: argparse.Namespace, design: str, log: Path) -> None:
        import httpx

        self.port = free_port()
        argv = [
            sys.executable,
            __file__,
            "--serve",
            "--design",
            design,
            "--model-dir",
            str(args.model_dir),
            "--tokens",
            str(args.tokens),
            "--port",
            str(self.port),
            "--threads",
            str(args.threads),
            "--max-batch",
            str(args.max_batch),
            "--dtype",
            args.dtype,
            "--audio-workers",
            str(args.audio_workers),
            *(["--quantize", args.quantize] if args.quantize else []),
        ]
        self.log = log.open("w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=7200)
        wait_until_ready(self.process, self.client, f"the {design} server", log)
        model = self.client.get("/info").json()["model"]
        self.frame_rate = 50 if model["version"] == 1 else 25  # speech tokens per second
        speakers = self.client.get("/speakers").json()["speakers"]
        presets = [v["name"] for v in speakers if v["kind"] == "preset"]
        self.voice = presets[0] if presets else self._save_voice()

    def _save_voice(self) -> str:
        files = {"audio": ("prompt.wav", PROMPT.read_bytes(), "audio/wav")}
        response = self.client.post(
            "/voices", data={"name": "bench", "prompt_text": PROMPT_TEXT}, files=files
        )
        response.raise_for_status()
        return "bench"

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def one_request(server: Server, text: str, seed: int, stream: bool, tokens: int) -> dict:
    import httpx

    body = {"text": text, "speaker": server.voice, "seed": seed, "stream": stream, "format": "pcm"}
    start = time.monotonic()
    first, size = None, 0
    with (
        httpx.Client(base_url=server.client.base_url, timeout=7200) as client,
        client.stream("POST", "/tts", json=body) as response,
    ):
        if response.status_code != 200:
            raise SystemExit(f"request failed: {response.status_code} {response.read()[:300]!r}")
        rate = int(response.headers["x-sample-rate"])
        for piece in response.iter_bytes():
            if piece and first is None:
                first = time.monotonic() - start
            size += len(piece)
    seconds = size / 2 / rate
    expected = tokens / server.frame_rate
    if abs(seconds - expected) > 0.03 * expected + 0.05:
        raise SystemExit(
            f"FIXED LENGTH NOT APPLIED: {seconds:.2f} s of audio, expected "
            f"{expected:.2f} s ({tokens} tokens); the benchmark is not valid"
        )
    return {"first": first, "latency": time.monotonic() - start, "audio": seconds}


def level(server: Server, concurrency: int, stream: bool, tokens: int, text: str) -> dict:
    pid = server.process.pid
    reset_peak(pid)
    results: list[dict] = [None] * concurrency
    start = time.monotonic()

    def run(i: int) -> None:
        results[i] = one_request(server, text, 1000 + i, stream, tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    if any(r is None for r in results):
        raise SystemExit("a request failed; see the server log")
    firsts, latencies = [r["first"] for r in results], [r["latency"] for r in results]
    return {
        "c": concurrency,
        "audio_per_s": sum(r["audio"] for r in results) / wall,
        "first_p50": statistics.median(firsts),
        "first_p95": percentile(firsts, 0.95),
        "latency_p50": statistics.median(latencies),
        "latency_p95": percentile(latencies, 0.95),
        "peak_rss_mib": rss_kib(pid, "VmHWM") / 1024,
        "wall": wall,
    }


def print_levels(design: str, transport: str, rows: list[dict], loaded_mib: float) -> None:
    base = rows[0]["audio_per_s"]
    print(f"\n{design} / {transport} (RSS after load and warm-up {loaded_mib:.0f} MiB)")
    print(
        f"{'c':>3} {'audio s/s':>9} {'speed-up':>8} {'TTFA p50':>9} {'p95':>7} "
        f"{'latency p50':>11} {'p95':>7} {'peak RSS':>9} {'MiB/req':>8}"
    )
    for r in rows:
        per_request = (r["peak_rss_mib"] - loaded_mib) / r["c"]
        print(
            f"{r['c']:>3} {r['audio_per_s']:>9.3f} {r['audio_per_s'] / base:>7.2f}x "
            f"{r['first_p50']:>8.1f}s {r['first_p95']:>6.1f}s {r['latency_p50']:>10.1f}s "
            f"{r['latency_p95']:>6.1f}s {r['peak_rss_mib']:>8.0f}M {per_request:>8.0f}"
        )


def drive(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from floors import describe, measure

    torch.set_num_threads(args.threads)
    floors = measure()
    print(describe(floors), flush=True)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    results: dict = {"floors": floors, "args": {k: str(v) for k, v in vars(args).items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for design in args.designs.split(","):
        server = Server(args, design, out / f"server-{design}.log")
        try:
            text = TEXTS[2 if server.frame_rate == 25 else 1]
            # warm-up; a streaming one too when streams are measured: the voice is then a saved
            # voice used before (its prompt's flow frames are computed once per voice)
            one_request(server, text, 1, "stream" in args.transports.split(","), args.tokens)
            loaded = rss_kib(server.process.pid, "VmRSS") / 1024
            for transport in args.transports.split(","):
                rows = []
                for c in concurrency:
                    row = level(server, c, transport == "stream", args.tokens, text)
                    rows.append(row)
                    print(
                        f"  {design} {transport} c={c}: {row['audio_per_s']:.3f} audio s/s, "
                        f"TTFA p95 {row['first_p95']:.1f} s, wall {row['wall']:.1f} s",
                        flush=True,
                    )
                results[f"{design}/{transport}"] = {"loaded_mib": loaded, "levels": rows}
        finally:
            server.close()
    results["load_average_end"] = os.getloadavg()
    (out / "serving.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nmodel {args.model_dir}, {args.tokens} speech tokens per request, "
        f"{args.threads} torch threads, max batch {args.max_batch}, {args.dtype}"
        f"{', ' + args.quantize if args.quantize else ''}, "
        f"{args.audio_workers} audio worker(s)"
    )
    for key, value in results.items():
        if "/" in key:
            design, transport = key.split("/")
            print_levels(design, transport, value["levels"], value["loaded_mib"])
    for transport in args.transports.split(","):
        for other in ("threads", "loop-rows-alone", "loop-wide"):
            if f"loop/{transport}" not in results or f"{other}/{transport}" not in results:
                continue
            loop = results[f"loop/{transport}"]["levels"]
            levels = results[f"{other}/{transport}"]["levels"]
            print(
                f"\nloop / {other}, {transport}: "
                + ", ".join(
                    f"c={a['c']}: throughput {a['audio_per_s'] / b['audio_per_s']:.2f}x, "
                    f"TTFA p95 {b['first_p95'] / a['first_p95']:.2f}x faster"
                    for a, b in zip(loop, levels, strict=True)
                )
            )
    print(
        describe({**floors, "load_average": results["load_average_end"]}).replace(
            "load average", "load average at the end"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="full-size random-weight directory (tools/make_models.py --size full)",
    )
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens per request")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--transports", default="whole,stream")
    parser.add_argument("--designs", default="loop,threads")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="weights' precision (float32, bfloat16)")
    parser.add_argument(
        "--quantize", choices=["int8"], help="int8 LLM (and CosyVoice3 DiT products)"
    )
    parser.add_argument("--audio-workers", type=int, default=2, help="engine loop audio threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serving"))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--design", default="loop", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
