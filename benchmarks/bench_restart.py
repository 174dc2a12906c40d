"""A saved voice's first stream after a server restart, with and without preparing saved voices
at start (``--prepare-voices``), through the real server.

One command: ``python benchmarks/bench_restart.py --model DIR [--dtype bfloat16] [--rounds 2]``
(a full-size CosyVoice2/3 random-weight directory, ``tools/make_models.py --size full``). A server
saves a voice (the 4.9 s test prompt) and stops; then, ``--rounds`` times, a server with
``--prepare-voices 0`` (the design before 2026-12-05) and one with ``--prepare-voices 4`` start on
that library in turn (the order alternating), each waits ``--settle`` seconds after it reports
ready (its preparation runs meanwhile), and the time to the first audio byte of two streams of the
saved voice is measured: the first (prepared or not) and the next (the voice's prompt frames are
computed by then in both). Only the first chunk is read (the connection is then closed), so random
weights that never stop do not matter. Prints each round, the medians and the ratio, the load
average and the floors measured in the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serving import free_port, wait_until_ready  # noqa: E402
from engine_requests import PROMPT, PROMPT_TEXT, TEXT  # noqa: E402 - the engine benchmarks' voice
from floors import describe, footer, measure  # noqa: E402


class Server:
    """``cosyvoice-lite serve`` on loopback, ready once ``/ready`` says so."""

    def __init__(self, args: argparse.Namespace, voices: str, prepare: int, log: Path) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "cosyvoice_lite.cli", "serve", "--model", str(args.model)]
        argv += ["--dtype", args.dtype, "--voices-dir", voices, "--port", str(port)]
        argv += ["--prepare-voices", str(prepare), "--threads", str(args.threads)]
        self.log = log
        self.process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        wait_until_ready(self.process, self.client, "the server", log)

    def first_audio(self, seed: int) -> float:
        """Seconds from a streamed request of the saved voice to its first audio byte."""
        body = {"text": TEXT, "speaker": "Saved", "stream": True, "seed": seed, "format": "pcm"}
        start = time.perf_counter()
        with self.client.stream("POST", "/tts", json=body) as response:
            if response.status_code != 200:
                raise SystemExit(f"stream failed: {response.status_code} {response.read()!r}")
            for chunk in response.iter_bytes():
                if chunk:
                    return time.perf_counter() - start
        raise SystemExit("the stream ended without audio")

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="full-size v2 or v3 directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=25.0, help="seconds after ready")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "restart")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_start = os.getloadavg()
    floors = describe(measure())
    args.out.mkdir(parents=True, exist_ok=True)
    voices = tempfile.mkdtemp(prefix="bench-restart-")
    saver = Server(args, voices, 0, args.out / "server-save.log")
    try:
        saved = saver.client.post(
            "/voices",
            data={"name": "Saved", "prompt_text": PROMPT_TEXT},
            files={"audio": ("prompt.wav", PROMPT.read_bytes(), "audio/wav")},
        )
        if saved.status_code != 201:
            raise SystemExit(f"saving the voice failed: {saved.status_code} {saved.text}")
    finally:
        saver.stop()
    results: dict[int, list[tuple[float, float]]] = {0: [], 4: []}
    for round_ in range(args.rounds):
        for prepare in (0, 4) if round_ % 2 == 0 else (4, 0):
            log = args.out / f"server-prepare-{prepare}-round-{round_ + 1}.log"
            server = Server(args, voices, prepare, log)
            try:
                time.sleep(args.settle)
                if prepare and "prepared 1 saved voice" not in log.read_text():
                    raise SystemExit(f"VOICE NOT PREPARED within --settle: see {log}")
                first, second = server.first_audio(1), server.first_audio(2)
            finally:
                server.stop()
            results[prepare].append((first, second))
            print(
                f"round {round_ + 1}, --prepare-voices {prepare}: first stream of the saved voice "
                f"{first:.2f} s to first audio, the next {second:.2f} s",
                flush=True,
            )
    medians = {
        prepare: tuple(statistics.median(r[i] for r in rows) for i in range(2))
        for prepare, rows in results.items()
    }
    print(f"\n{args.model.name} {args.dtype}, {args.threads} threads, median of {args.rounds}:")
    for prepare, (first, second) in medians.items():
        print(f"  --prepare-voices {prepare}: first stream {first:.2f} s, next {second:.2f} s")
    print(f"  first stream, not prepared / prepared: {medians[0][0] / medians[4][0]:.2f}x")
    print(footer(floors, load_start))


if __name__ == "__main__":
    main()
