"""Issue 11, connections: the header timeout closes half-sent requests, the connection cap answers
503 at once instead of hanging, and descriptor exhaustion is logged once per interval. uvicorn
is configured exactly as `serve` does (serving.server.uvicorn_config), on loopback."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from test_server_support import (
    free_port,
    metric,
    serve_argv,
    status_of,
    tiny_engine,
    wait_for,
)

from cosyvoice_lite.serving import Settings, create_app
from cosyvoice_lite.serving.server import install_log_throttle, uvicorn_config


@pytest.fixture(scope="module")
def server(v1_dir, tmp_path_factory):
    settings = Settings(
        max_connections=6,
        header_timeout=1.0,
        keep_alive_timeout=1.0,
        send_timeout=2.0,
        voices_dir=tmp_path_factory.mktemp("voices"),
    )
    port = free_port()
    config = uvicorn_config(
        create_app(tiny_engine(v1_dir), settings), settings, "127.0.0.1", port, log_level="warning"
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", port
    running.should_exit = True
    thread.join(timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes ``sock`` (None if it stays open that long)."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_request_framed_two_ways_is_refused_and_its_connection_closed(server):
    """Content-Length and Transfer-Encoding both: a proxy in front that frames by the length
    reads the rest as another request (smuggling). The request had been answered (422), then
    the request tucked in behind it too (200) on the same connection."""
    _, port = server
    smuggled = b"GET /voices HTTP/1.1\r\nHost: x\r\n\r\n"
    both = (
        b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(both)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"ambiguous_length" in answer, answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing answered after it: the connection closed


def test_half_sent_request_is_closed_after_the_header_timeout(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        took = closed_within(sock, 5)
    assert took is not None and took < 3


def test_idle_connection_after_a_response_gets_the_same_deadline(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /he")  # a byte of the next request stops the keep-alive timer
        assert closed_within(sock, 5) is not None


def test_a_body_still_coming_after_its_response_gets_the_same_deadline(server):
    """The response is out (a public /health answered while its announced body is still to
    come); one more byte stopped every timer: a connection held for ever, without a key."""
    _, port = server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"x")
        took = closed_within(sock, 5)
    assert took is not None and took < 3


def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout(server):
    """A response its client never reads (its socket's buffers full) held the connection, the
    unsent bytes (a saved voice's 21 MB recording, 100 times over: 2.2 GB) and, for a stream,
    its admission slot, for ever."""
    url, port = server
    seconds, rate = 29, 96000  # stored as float32: 11 MB, past what the sockets buffer
    save_long_voice(url, "long", seconds, rate)
    with small_reader(port, "/voices/long/audio") as sock:
        time.sleep(5.0)  # reads nothing: past the send timeout (2 s)
        got, closed = 0, False
        sock.settimeout(5)
        try:
            while chunk := sock.recv(1 << 16):
                got += len(chunk)
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    assert closed and got < seconds * rate * 4, got  # dropped, most of it never sent


def test_a_client_that_reads_slowly_gets_its_whole_response(server):
    """The send timeout measured the time to drain the whole buffer, not whether the client
    read: a player reading a long WAV at its own pace was cut 43 s of audio before the end."""
    url, port = server
    save_long_voice(url, "slowly", 29, 48000)  # stored as float32: 5.6 MB, past the buffers
    with small_reader(port, "/voices/slowly/audio") as sock:
        start = time.monotonic()
        time.sleep(1.5)  # the buffers fill (the send timer starts)
        sock.settimeout(10)
        got = b""
        while b"\r\n\r\n" not in got or len(got) < expected(got):
            chunk = sock.recv(65536)  # 8 KB at a time, ~2 MB/s: past the send timeout of 2 s
            if not chunk:
                break
            got += chunk
            time.sleep(0.004)
    assert len(got) == expected(got), len(got)
    assert time.monotonic() - start > 2.5  # (it did read past the timeout)


def save_long_voice(url: str, name: str, seconds: int, rate: int) -> None:
    """A saved voice whose stored recording (float32 WAV at ``rate``) is large."""
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(seconds * rate) / rate
    samples = 0.3 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    audio = io.BytesIO()
    sf.write(audio, samples.astype(np.float32), rate, format="FLAC")
    created = httpx.post(
        f"{url}/voices",
        data={"name": name},
        files={"audio": (f"{name}.flac", audio.getvalue(), "audio/flac")},
        timeout=60,
    )
    assert created.status_code == 201, created.text


@contextlib.contextmanager
def small_reader(port: int, path: str):
    """A client socket with a 4 KB receive buffer that has asked for ``path``."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        yield sock


def expected(response: bytes) -> int:
    """The length of a whole HTTP response from its head's Content-Length (or 1 << 62)."""
    head, sep, _ = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 1 << 62


def test_connection_cap_answers_503_at_once_then_recovers(server):
    """Past the cap a request is answered at once: 503 JSON with Retry-After, counted, and its
    connection closed; probes and scrapes are still answered (uvicorn's own cap had answered
    /health a plain-text 503 that metrics and logs never saw: an orchestrator restarted a busy
    but healthy replica). The cap's own connections are all served (uvicorn had served one
    fewer: 6 connections were answered 200, 200, ..., 503)."""
    url, port = server

    def refusals() -> float:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return metric(text, "cosyvoice_errors_total", code="too_many_connections")

    before = refusals()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]  # 6 with the next
    try:
        time.sleep(0.2)
        assert httpx.get(f"{url}/voices", timeout=5).status_code == 200
        idle += [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # > cap of 6
        time.sleep(0.2)
        start = time.monotonic()
        response = httpx.get(f"{url}/voices", timeout=5)
        assert response.status_code == 503 and time.monotonic() - start < 2
        assert response.json()["error"]["code"] == "too_many_connections"
        assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert refusals() == before + 1
        over = httpx.Client(base_url=url, timeout=5)  # a connection opened past the cap
        assert over.get("/health").status_code == 200
    finally:
        for sock in idle:
            sock.close()
    # the idle sockets were also closed by the header timeout; the server serves again, the
    # connection opened past the cap too (it had been refused for its whole life)
    time.sleep(0.5)
    assert over.get("/voices").status_code == 200
    over.close()
    assert httpx.get(f"{url}/voices", timeout=5).status_code == 200


def test_descriptor_exhaustion_is_logged_once_per_interval(caplog):
    throttle = install_log_throttle(interval=60)
    logger = logging.getLogger("asyncio")
    error = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(5000):  # what a flood of failed accepts would log
            logger.error("socket.accept() out of system resource", exc_info=(OSError, error, None))
        logger.error("an unrelated error")
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.getMessage() for r in records] == [
        "socket.accept() out of system resource",
        "an unrelated error",
    ]
    assert records[0].exc_info is None  # no traceback per line
    assert throttle.suppressed == 4999
    install_log_throttle()  # back to the default interval


def test_descriptor_exhaustion_in_a_real_server_neither_floods_the_log_nor_wedges_it(
    v1_dir, tmp_path
):
    """`serve` with 256 descriptors and 600 idle connections thrown at it: the log stays short,
    and once the header timeout has closed the idle ones the server answers again."""
    import os
    import resource
    import subprocess

    port = free_port()
    command = serve_argv(
        v1_dir, port, tmp_path / "voices", "--header-timeout", "2",
        "--max-connections", "1000", "--log-format", "text",
    )  # fmt: skip

    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_descriptors,
            env=os.environ.copy(),
        )
    url = f"http://127.0.0.1:{port}"

    def health(path: str = "/health") -> int | None:
        return status_of(f"{url}{path}", timeout=3)

    sockets: list[socket.socket] = []
    try:
        assert wait_for(lambda: health("/ready") == 200, timeout=120), "model did not load"
        for _ in range(600):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.sendall(b"GET /health HTTP/1.1\r\n")  # half a request
                sockets.append(sock)
            except OSError:
                break
        time.sleep(1)
        open_fds = len(os.listdir(f"/proc/{process.pid}/fd"))
        time.sleep(2)
        for sock in sockets:
            sock.close()
        assert wait_for(lambda: health("/ready") == 200, timeout=15)
    finally:
        for sock in sockets:
            sock.close()
        process.terminate()
        process.wait(timeout=30)
    lines = log_path.read_text(errors="replace").splitlines()
    print(
        f"descriptor exhaustion: {len(sockets)} connections, {open_fds} descriptors open, "
        f"{len(lines)} log lines"
    )
    assert len(lines) < 100, "\n".join(lines[-20:])
    assert sum("Traceback" in line for line in lines) <= 2


def test_serve_options_reach_the_settings():
    import argparse

    from cosyvoice_lite.serving.cli import add_serve_command, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args([
        "serve", "--model", "m", "--max-connections", "64", "--header-timeout", "3",
        "--body-timeout", "7", "--keep-alive", "2", "--shutdown-timeout", "4", "--docs-public",
        "--max-instruct-chars", "80", "--max-prompt-text-chars", "90", "--max-json-mb", "2",
    ])  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.max_connections, settings.header_timeout, settings.body_timeout) == (64, 3, 7)
    assert (settings.keep_alive_timeout, settings.shutdown_timeout) == (2, 4)
    assert settings.docs_public and settings.max_json_bytes == 2 * 1024 * 1024
    assert (settings.max_instruct_chars, settings.max_prompt_text_chars) == (80, 90)


def test_serve_defaults_are_the_settings_defaults():
    """The CLI states its defaults as literals (parsing loads no torch); they must be the
    Settings' own, and an out-of-range --storage-waiters is refused with its range."""
    import argparse
    import dataclasses

    from cosyvoice_lite.serving import Settings
    from cosyvoice_lite.serving.cli import add_serve_command, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    settings = settings_from_args(parser.parse_args(["serve", "--model", "m"]))
    defaults = Settings()
    differing = {
        field.name
        for field in dataclasses.fields(Settings)
        if getattr(settings, field.name) != getattr(defaults, field.name)
    }
    assert differing <= {"voices_dir", "spool_dir", "api_key", "allowed_hosts"}, differing
    # on the default loopback address, only its own names (a DNS-rebound site's are refused)
    assert settings.allowed_hosts == ["localhost", "127.0.0.1", "::1"]
    public = settings_from_args(parser.parse_args(["serve", "--model", "m", "--host", "0.0.0.0"]))
    assert public.allowed_hosts == []  # any: behind a proxy, on a network
    keyed = settings_from_args(parser.parse_args(["serve", "--model", "m", "--api-key", "k"]))
    assert keyed.allowed_hosts == []  # a proxy in front may pass its own Host; the key guards
    # names given are added to a loopback server's own (curl 127.0.0.1, a local scrape), as
    # header names are read: lower case, no port, brackets or final dot
    named = [
        "serve",
        "--model",
        "m",
        "--allowed-host",
        "TTS.Example.com:443",
        "--allowed-host",
        "x.",
    ]
    assert settings_from_args(parser.parse_args(named)).allowed_hosts == [
        "tts.example.com", "x", "localhost", "127.0.0.1", "::1"
    ]  # fmt: skip
    on_network = [*named, "--host", "0.0.0.0"]
    assert settings_from_args(parser.parse_args(on_network)).allowed_hosts == [
        "tts.example.com",
        "x",
    ]
    args = parser.parse_args(["serve", "--model", "m", "--storage-waiters", "33"])
    with pytest.raises(ValueError, match="--storage-waiters must be 1-32"):
        settings_from_args(args)
    args = parser.parse_args(["serve", "--model", "m", "--max-instruct-chars", "5000"])
    with pytest.raises(ValueError, match="--max-instruct-chars must be at most 4096"):
        settings_from_args(args)  # the engine would refuse every longer one


def test_engine_options_of_serve_reach_the_engine_load():
    import argparse

    from cosyvoice_lite.serving.cli import add_serve_command, ray_options_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args([
        "serve", "--model", "m", "--max-batch", "4", "--audio-workers", "3",
        "--backend", "onnxruntime", "--onnx-dir", "graphs",
    ])  # fmt: skip
    load = ray_options_from_args(args).load
    assert (load["max_batch"], load["audio_workers"]) == (4, 3)
    assert (load["backend"], load["onnx_dir"]) == ("onnxruntime", "graphs")


def test_made_up_methods_share_one_metrics_series(server):
    """h11 (what `serve` runs) passes any token as a method: each made-up one must not become
    a new metrics series kept for good (a client could grow /metrics and memory without end)."""
    url, port = server
    for n in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"M%05dXYZ /tts HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            assert sock.recv(4096).startswith(b"HTTP/1.1 4")
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert "M00001XYZ" not in text
    assert 'method="OTHER"' in text
