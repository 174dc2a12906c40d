"""Helpers shared by the server tests (no tests here): a real uvicorn server on a loopback port in
a thread, the tiny engine loaded once per session, prompt audio, and an engine wrapper that slows
synthesis down and records cancellation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import uvicorn

_ENGINES: dict[tuple[str, str | None], object] = {}


def tiny_engine(model_dir: Path, variant: str | None = None):
    """The tiny v1 engine, loaded once per test session (loading is the slow part)."""
    key = (str(model_dir), variant)
    if key not in _ENGINES:
        from cosyvoice_lite.engine import Engine

        _ENGINES[key] = Engine.load(model_dir, variant=variant)
    return _ENGINES[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread (the real HTTP stack)."""

    def __init__(self, app, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)


def serve_argv(model_dir: Path, port: int, voices_dir: Path, *options: str) -> list[str]:
    """The command line of a real `cosyvoice-lite serve` process on a loopback ``port``."""
    return [
        sys.executable, "-m", "cosyvoice_lite.cli", "serve", "--model", str(model_dir),
        "--port", str(port), "--voices-dir", str(voices_dir), *options,
    ]  # fmt: skip


def interrupted_output(process: subprocess.Popen) -> str:
    """Stop a `serve` process as Ctrl-C does (killed if it will not stop) and return what it
    printed."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


def status_of(url: str, timeout: float = 5) -> int | None:
    """The HTTP status of a GET of ``url``, None while nothing answers there."""
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.TransportError:
        return None


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def prompt_wav(
    seconds: float = 2.0, rate: int = 16000, amplitude: float = 0.3, format: str = "WAV"
) -> bytes:
    """A voiced-sounding prompt: a few harmonics with a slow syllable-like envelope."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t)
    samples = (amplitude * voice * envelope / 2.3).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=format)
    return buffer.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode mono audio in any container libsndfile reads, including streamed files whose header
    says "length unknown". (soundfile's own read() seeks after every block, which libsndfile
    refuses for such FLAC streams, so this reads with sf_readf_float directly.)"""
    from soundfile import _ffi, _snd

    with sf.SoundFile(io.BytesIO(data)) as f:
        assert f.channels == 1
        blocks, block = [], np.zeros(4096, np.float32)
        while True:
            n = _snd.sf_readf_float(f._file, _ffi.cast("float *", block.ctypes.data), len(block))
            if n <= 0:
                break
            blocks.append(block[:n].copy())
        rate = f.samplerate
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), rate


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


class ProbeJob:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class EngineProbe:
    """Wraps the real tiny engine for the server tests.

    * ``memo``: seeded requests are synthesized once and replayed afterwards (the tiny model
      still needs a few seconds per request on a busy 2-core machine; this way testing five
      formats of the same sentence costs one synthesis). Unseeded requests are never replayed.
    * ``split`` / ``delay``: each chunk is handed out in ``split`` pieces with ``delay`` seconds
      before each, so that streaming, the queue and cancellation can be observed however fast
      or slow the model is. The audio is unchanged.
    * counters: syntheses started, closed (also when the client went away) and completed.
    """

    cache: dict[tuple, list] = {}  # shared by all probes of a session (keyed by engine too)

    def __init__(self, engine, memo: bool = True, split: int = 1, delay: float = 0.0) -> None:
        self._engine = engine
        self.memo, self.split, self.delay = memo, split, delay
        self.started = self.closed = self.completed = self.computed = self.encodes = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode_prompt(self, audio, prompt_text=""):
        with self.lock:
            self.encodes += 1
        return self._engine.encode_prompt(audio, prompt_text)

    def _key(self, request, prompt) -> tuple | None:
        if request.seed is None or not isinstance(request.text, str):
            return None
        prompt_key = None
        if prompt is not None:
            prompt_key = (
                prompt.prompt_text,
                tuple(prompt.speech_tokens.flatten().tolist()),
                float(prompt.embedding.sum()),
                float(prompt.speech_feat.sum()),
            )
        return (
            id(self._engine),
            request.mode,
            request.text,
            request.voice,
            request.prompt_text,
            request.instruct,
            request.speed,
            request.seed,
            request.stream,
            request.text_frontend,
            prompt_key,
        )

    def _chunks(self, request, progress, prompt):
        key = self._key(request, prompt) if self.memo else None
        if key is not None and key in self.cache:
            yield from self.cache[key]
            return
        with self.lock:
            self.computed += 1
        produced = []
        inner = self._engine.synthesize(request, progress, prompt)
        try:
            for chunk in inner:
                produced.append(chunk)
                yield chunk
        finally:
            inner.close()
        if key is not None:
            self.cache[key] = produced

    def submit(self, request, sink, progress=None, prompt=None):
        """The server's entry point: the probe's synthesis relayed to ``sink`` from a thread."""
        job = ProbeJob()

        def relay() -> None:
            chunks = None
            try:
                features = prompt() if callable(prompt) else prompt
                chunks = self.synthesize(request, progress, features)
                for chunk in chunks:
                    if job.cancelled.is_set():
                        break
                    sink.chunk(chunk)
            except Exception as exc:  # noqa: BLE001 - handed to the server, which reports it
                sink.end(exc)
                return
            finally:
                if chunks is not None:
                    chunks.close()
            sink.end(None)

        threading.Thread(target=relay, name="probe", daemon=True).start()
        return job

    def synthesize(self, request, progress=None, prompt=None):
        with self.lock:
            self.started += 1
        chunks = self._chunks(request, progress, prompt)
        try:
            for chunk in chunks:
                for piece in np.array_split(chunk.samples, self.split):
                    time.sleep(self.delay)
                    yield dataclasses.replace(chunk, samples=piece)
            with self.lock:
                self.completed += 1
        finally:
            chunks.close()
            with self.lock:
                self.closed += 1


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server():
    """A real S3 API on a loopback port (moto server mode), with test credentials set."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url, timeout=2).status_code < 500
        except httpx.TransportError:
            return False

    try:
        assert wait_for(up, timeout=60), "moto server did not start"
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
