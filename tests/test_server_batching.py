"""The server on the engine loop (the real tiny engine, no probe): concurrent clients are decoded
together and each gets its own audio; a client that goes away frees its row; overload is 429."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_server_support import ServerThread, tiny_engine, wait_for

from cosyvoice_lite.serving import Settings, create_app

TEXTS = ["谢谢。", "再见，明天见。", "早上好。", "今天天气很好，我们去公园吧。"]


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    settings = Settings(workers=4, max_queue=2, voices_dir=root / "voices")
    with ServerThread(create_app(engine, settings)) as running:
        yield running


def _pcm(client, text: str, seed: int, stream: bool, voice: str) -> np.ndarray:
    response = client.post(
        "/tts",
        json={"text": text, "speaker": voice, "seed": seed, "stream": stream, "format": "pcm"},
    )
    assert response.status_code == 200, response.text
    return np.frombuffer(response.content, dtype="<i2").astype(np.float32) / 32768


def test_concurrent_clients_are_batched_and_each_gets_its_own_audio(server, engine) -> None:
    voice = engine.voices()[0]
    with server.client() as client:
        alone = [_pcm(client, t, i, i % 2 == 1, voice) for i, t in enumerate(TEXTS)]
    steps, rows = engine.loop.steps, engine.loop.rows_stepped
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        with server.client() as own:
            results[i] = _pcm(own, TEXTS[i], i, i % 2 == 1, voice)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.loop.rows_stepped - rows > engine.loop.steps - steps > 0  # decoded together
    for i, a in enumerate(alone):
        assert results[i].shape == a.shape
        np.testing.assert_allclose(results[i], a, atol=2 / 32768, rtol=0)  # int16 rounding


def test_a_client_that_goes_away_frees_its_row(server, engine) -> None:
    voice = engine.voices()[0]
    long_text = "，".join(["今天天气很好"] * 12) + "。"
    with (
        server.client() as client,
        client.stream(
            "POST",
            "/tts",
            json={"text": long_text, "speaker": voice, "stream": True, "format": "pcm"},
        ) as response,
    ):
        assert response.status_code == 200
        next(response.iter_bytes())
        assert engine.loop.active == 1
    wait_for(lambda: engine.loop.active == 0, timeout=10)


def test_overload_is_429_with_retry_after(server, engine) -> None:
    voice = engine.voices()[0]
    long_text = "，".join(["今天天气很好"] * 12) + "。"
    statuses: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        with server.client() as own:
            response = own.post("/tts", json={"text": long_text, "speaker": voice, "format": "pcm"})
            with lock:
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert int(response.headers["retry-after"]) >= 1

    threads = [threading.Thread(target=run) for _ in range(9)]  # capacity 4 + 2
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert statuses.count(429) >= 3 and statuses.count(200) >= 1


class TimedSinks:
    """The real engine, recording how long its loop spends handing audio to each request."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.seconds: list[float] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, request, sink, progress=None, prompt=None):
        timer = self

        class Timed:
            def __getattr__(self, name):
                return getattr(sink, name)

            def chunk(self, chunk) -> None:
                start = time.perf_counter()
                sink.chunk(chunk)
                timer.seconds.append(time.perf_counter() - start)

            def end(self, error) -> None:
                start = time.perf_counter()
                sink.end(error)
                timer.seconds.append(time.perf_counter() - start)

        return self._engine.submit(request, Timed(), progress, prompt)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_are_encoded_off_the_engine_loop(engine, tmp_path, stream) -> None:
    """Opus costs ~25 ms per second of audio to encode: on the loop thread it stopped every other
    row meanwhile. The loop now only hands the samples over; the client's audio is the same."""
    from test_server_support import decode

    from cosyvoice_lite.serving.streaming import Encoder, WholeEncoder

    timed = TimedSinks(engine)
    settings = Settings(voices_dir=tmp_path / "voices")
    text = "，".join(["今天天气很好"] * 6) + "。"
    body = {"text": text, "speaker": engine.voices()[0], "seed": 3, "stream": stream}
    with ServerThread(create_app(timed, settings)) as running, running.client() as client:
        opus = client.post("/tts", json={**body, "format": "opus"})
        pcm = client.post("/tts", json={**body, "format": "pcm"})
    assert opus.status_code == pcm.status_code == 200, opus.text
    samples = np.frombuffer(pcm.content, "<i2").astype(np.float32) / 32768
    assert decode(opus.content)[0].size > 0 and samples.size > engine.sample_rate
    start = time.perf_counter()  # what encoding it costs, on this machine now
    encoder = (Encoder if stream else WholeEncoder)("opus", engine.sample_rate)
    encoder.feed(samples)
    encoder.finish()
    encoding = time.perf_counter() - start
    handed_over = sum(timed.seconds)  # both requests' chunks and ends
    assert handed_over < 0.25 * encoding, (handed_over, encoding)
