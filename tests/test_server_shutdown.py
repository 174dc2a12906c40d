"""Issue 11: a graceful stop of the real `cosyvoice-lite serve` process is bounded by
--shutdown-timeout, and a stream it cuts off is aborted, not ended as if complete."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
from test_server_support import free_port, serve_argv, status_of, wait_for

TEXT = "今天天气很好，我们一起去公园散步吧。" * 40  # long enough to still be streaming at SIGTERM


def test_sigterm_during_a_stream_stops_within_the_bound_and_aborts_the_stream(v1_dir, tmp_path):
    port = free_port()
    command = serve_argv(
        v1_dir, port, tmp_path / "voices", "--shutdown-timeout", "1", "--log-format", "text"
    )
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    url = f"http://127.0.0.1:{port}"

    outcome: dict[str, object] = {"bytes": 0}
    started = threading.Event()

    def stream() -> None:
        voice = httpx.get(f"{url}/speakers").json()["speakers"][0]["name"]
        try:
            with httpx.stream(
                "POST",
                f"{url}/tts",
                timeout=60,
                json={"text": TEXT, "speaker": voice, "stream": True, "format": "pcm"},
            ) as response:
                for piece in response.iter_bytes():
                    outcome["bytes"] = int(outcome["bytes"]) + len(piece)
                    started.set()
            outcome["end"] = "complete"
        except httpx.HTTPError as exc:
            outcome["end"] = type(exc).__name__

    try:
        assert wait_for(lambda: status_of(f"{url}/ready") == 200, timeout=120), (
            "server did not become ready"
        )
        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(60), "no audio arrived"
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        stopped_in = time.monotonic() - start
        client.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert stopped_in < 8, f"stopping took {stopped_in:.1f} s"
    assert outcome["end"] == "RemoteProtocolError", outcome  # incomplete chunked body
    assert int(outcome["bytes"]) > 0
