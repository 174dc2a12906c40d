"""Issue 11: a short soak of the real `cosyvoice-lite serve` process (tiny model): a few hundred
requests of every kind (syntheses, streams, voice uploads and deletes, hostile bodies, errors),
the process's RSS sampled from /proc after each round. After warm-up it must level off."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_server_support import free_port, prompt_wav, serve_argv, status_of, wait_for

# The resident size grows over the first rounds (allocator arenas and caches warming up, and
# oneDNN's kernels for the packed float32 layers' row counts, a few sizes per power of two:
# precision.padded_rows). A 40-round run went 522 -> ~640 MB by round 13, then stayed within
# 630-651 MB; so the check looks at the second half of 24 rounds (10 judged the warm-up's tail).
ROUNDS = int(os.environ.get("SOAK_ROUNDS", "24"))  # a longer soak: SOAK_ROUNDS=50
PER_ROUND = 40  # about 45 requests per round: 1,080 by default


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def one_round(client: httpx.Client, voice: str, round_no: int) -> dict[int, int]:
    statuses: dict[int, int] = {}

    def count(response: httpx.Response) -> None:
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    name = f"soak{round_no}"
    count(
        client.post(
            "/voices",
            data={"name": name, "prompt_text": "你好。"},
            files={"audio": ("p.wav", prompt_wav(1.0, rate=16001), "audio/wav")},
        )
    )
    for i in range(PER_ROUND - 2):
        kind = i % 8
        if kind == 0:
            count(client.post("/tts", json={"text": "你好。", "speaker": voice, "seed": i}))
        elif kind == 1:
            with client.stream(
                "POST",
                "/tts",
                json={"text": "你好。", "speaker": voice, "stream": True, "format": "pcm"},
            ) as r:
                r.read()
                count(r)
        elif kind == 2:
            count(client.post("/tts", json={"text": "好。", "speaker": name, "seed": i}))
        elif kind == 3:  # hostile: oversized JSON, lone surrogate, far too long instruct
            count(
                client.post(
                    "/tts",
                    content=b'{"text": "' + b"x" * 1_500_000 + b'"}',
                    headers={"content-type": "application/json"},
                )
            )
            count(
                client.post(
                    "/tts",
                    content=b'{"text": "\\ud800", "speaker": "x"}',
                    headers={"content-type": "application/json"},
                )
            )
        elif kind == 4:
            count(
                client.post(
                    "/tts", json={"text": "你好", "speaker": voice, "instruct": "x" * 50_000}
                )
            )
        elif kind == 5:
            count(client.get("/voices"))
        elif kind == 6:
            count(client.get("/metrics"))
        else:
            count(client.post("/tts", json={"text": "你好", "speaker": "nobody"}))
    count(client.delete(f"/voices/{name}"))
    return statuses


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_rss_levels_off_over_a_thousand_requests(v1_dir, tmp_path):
    port = free_port()
    options = ["--max-text-chars", "50", "--max-upload-mb", "1", "--log-format", "text"]
    process = subprocess.Popen(
        serve_argv(v1_dir, port, tmp_path / "voices", *options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    url = f"http://127.0.0.1:{port}"

    curve: list[float] = []
    try:
        assert wait_for(lambda: status_of(f"{url}/ready") == 200, timeout=120), (
            "server did not become ready"
        )
        voice = httpx.get(f"{url}/speakers").json()["speakers"][0]["name"]
        start = time.monotonic()
        statuses: dict[int, int] = {}
        with httpx.Client(base_url=url, timeout=60) as client:
            for round_no in range(ROUNDS):
                for status, n in one_round(client, voice, round_no).items():
                    statuses[status] = statuses.get(status, 0) + n
                curve.append(rss_mb(process.pid))
        took = time.monotonic() - start
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    total = sum(statuses.values())
    print(
        f"soak: {total} requests in {took:.1f} s, statuses {dict(sorted(statuses.items()))}, "
        f"RSS MB per round {[round(x) for x in curve]}"
    )
    assert total >= 250
    assert not any(status >= 500 for status in statuses)
    # warm-up is the first rounds; afterwards the curve is flat but for allocator noise, which
    # includes one-round jumps of ~+20 MB (seen at the session start's commit and after it, one
    # failing a CI run by 3 MB on its very last round): medians of four rounds, so that a single
    # jump does not count while a leak, which grows every round, still does
    settled = curve[ROUNDS // 2 :]
    start, end = statistics.median(settled[:4]), statistics.median(settled[-4:])
    assert end - start < max(40.0, 0.08 * start), curve
