"""Issue 11: a graceful stop of the real `cosyvoice-lite serve` process is bounded by
--shutdown-timeout, and a stream it cuts off is aborted, not ended as if complete."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import httpx
from test_server_support import free_port, serve_argv, status_of, wait_for

TEXT = "今天天气很好，我们一起去公园散步吧。" * 40  # long enough to still be streaming at SIGTERM


def test_sigterm_during_requests_stops_within_the_bound_and_ends_each_as_documented(
    v1_dir, tmp_path
):
    """At the end of --shutdown-timeout uvicorn cancels the requests still running: a stream is
    aborted (an incomplete chunked body), server-sent events end with an ``error`` event, and a
    whole request still waiting for its audio gets 503 ``shutting_down`` as JSON (it had been
    uvicorn's plain-text 500, with a traceback logged per request)."""
    port = free_port()
    command = serve_argv(
        v1_dir, port, tmp_path / "voices", "--shutdown-timeout", "1", "--log-format", "text"
    )
    log = tmp_path / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    url = f"http://127.0.0.1:{port}"
    outcomes: dict[str, dict[str, object]] = {}
    started = {name: threading.Event() for name in ("stream", "events", "whole")}

    def run(name: str, path: str, body: dict) -> None:
        outcome = outcomes[name] = {"bytes": 0, "last": b""}
        try:
            with httpx.stream("POST", f"{url}{path}", timeout=60, json=body) as response:
                outcome["status"] = response.status_code
                if name == "whole":
                    started[name].set()
                for piece in response.iter_bytes():
                    outcome["bytes"] = int(outcome["bytes"]) + len(piece)
                    outcome["last"] = (bytes(outcome["last"]) + piece)[-2000:]
                    started[name].set()
            outcome["end"] = "complete"
        except httpx.HTTPError as exc:
            outcome["end"] = type(exc).__name__

    try:
        assert wait_for(lambda: status_of(f"{url}/ready") == 200, timeout=120), (
            "server did not become ready"
        )
        voice = httpx.get(f"{url}/speakers").json()["speakers"][0]["name"]
        speech = {"model": "tts-1", "voice": voice, "input": TEXT, "response_format": "pcm"}
        clients = [
            threading.Thread(target=run, args=args)
            for args in [
                (
                    "stream",
                    "/tts",
                    {"text": TEXT, "speaker": voice, "stream": True, "format": "pcm"},
                ),
                ("events", "/v1/audio/speech", {**speech, "stream_format": "sse"}),
            ]
        ]
        for client in clients:
            client.start()
        assert started["stream"].wait(60) and started["events"].wait(60), "no audio arrived"
        whole = threading.Thread(
            target=run, args=("whole", "/tts", {"text": TEXT, "speaker": voice, "format": "pcm"})
        )
        whole.start()
        # a JSON body still arriving: it was uvicorn's plain-text 500 and a traceback
        half_sent = socket.create_connection(("127.0.0.1", port), timeout=30)
        half_sent.sendall(
            b"POST /tts HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": '
        )
        time.sleep(0.5)  # (admitted)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        stopped_in = time.monotonic() - start
        for client in [*clients, whole]:
            client.join(timeout=30)
        with half_sent:
            answer = half_sent.recv(65536)
    finally:
        if process.poll() is None:
            process.kill()
    assert stopped_in < 8, f"stopping took {stopped_in:.1f} s"
    assert outcomes["stream"]["end"] == "RemoteProtocolError", outcomes["stream"]  # incomplete
    assert int(outcomes["stream"]["bytes"]) > 0
    events = outcomes["events"]
    assert events["end"] == "complete" and b'"type": "error"' in bytes(events["last"]), events
    assert b"shutting_down" in bytes(events["last"])
    whole_outcome = outcomes["whole"]
    assert whole_outcome["status"] == 503 and b"shutting_down" in bytes(whole_outcome["last"])
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting_down" in answer, answer
    logged = log.read_text(errors="replace")
    assert "Exception in ASGI application" not in logged and "Traceback" not in logged, logged
