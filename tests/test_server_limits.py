"""The server under pressure and in operation: the bounded queue (429 + Retry-After), cancellation
when the client goes away, the per-request timeout, background model loading, the API key, CORS,
voices surviving a restart, and the real `cosyvoice-lite serve` command in a subprocess."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from test_server_support import (
    EngineProbe,
    ServerThread,
    decode,
    free_port,
    interrupted_output,
    metric,
    prompt_wav,
    serve_argv,
    status_of,
    tiny_engine,
    wait_for,
)

from cosyvoice_lite.errors import ModelDirError
from cosyvoice_lite.serving import Settings, create_app
from cosyvoice_lite.serving.scheduler import Job

LONG = "你好。今天天气很好。我们去公园吧。"  # three sentences: three segments, several chunks


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture(scope="module")
def preset(engine) -> str:
    return engine.voices()[0]


@pytest.fixture(scope="module")
def slow(engine):
    """The real engine, each chunk handed out in 5 pieces 0.4 s apart: requests take a while."""
    return EngineProbe(engine, memo=True, split=5, delay=0.4)


@pytest.fixture(scope="module")
def busy(slow, tmp_path_factory):
    """One worker and a queue of one: the third request at a time is refused."""
    settings = Settings(
        workers=1, max_queue=1, request_timeout=60, voices_dir=tmp_path_factory.mktemp("busy")
    )
    with ServerThread(create_app(slow, settings)) as running:
        yield running


def gauge(server, name: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=10).text, name)


def test_queue_full_gives_429_with_retry_after(busy, preset):
    statuses: list[int] = []

    def hold() -> None:
        with busy.client() as own:
            statuses.append(
                own.post("/tts", json={"text": LONG, "speaker": preset, "seed": 1}).status_code
            )

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    assert wait_for(lambda: gauge(busy, "cosyvoice_requests_in_flight") == 2, timeout=10)
    assert gauge(busy, "cosyvoice_queue_depth") == 1
    with busy.client() as own:
        refused = own.post("/tts", json={"text": "你好。", "speaker": preset})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        # the OpenAI endpoint shares the queue
        assert (
            own.post(
                "/v1/audio/speech", json={"model": "tts-1", "input": "你好。", "voice": preset}
            ).status_code
            == 429
        )
    for t in holders:
        t.join()
    assert statuses == [200, 200]
    with busy.client() as own:
        assert own.post("/tts", json={"text": "你好。", "speaker": preset}).status_code == 200
    assert metric(httpx.get(f"{busy.url}/metrics").text, "cosyvoice_rejected_total") >= 2


def test_a_streamed_job_holds_its_slot_until_its_output_is_read_or_abandoned():
    """A streamed response's audio waits in its job for the client. Past what the sockets
    buffer (a few MB), a client that reads slowly or not at all keeps it there: its slot is
    held until the output is read to its end, or the response is over (cancel), so what is kept
    for such clients is at most one request's output per slot, not one per connection."""
    import asyncio

    from cosyvoice_lite.serving.scheduler import Overloaded, Scheduler

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(slots=1, max_queue=0)
        for how in ("read", "abandoned"):
            job = Job(loop, deadline=time.monotonic() + 60, held_until_read=True)
            scheduler.submit(job, lambda job: None)
            job.put(b"audio")
            job.finish()  # all of it made, none of it read yet
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                scheduler.submit(Job(loop, deadline=time.monotonic() + 60), lambda job: None)
            if how == "read":
                assert [piece async for piece in job] == [b"audio"]
            else:
                job.cancel()  # the response is over: the client went away
            assert scheduler.in_flight == 0
        whole = Job(loop, deadline=time.monotonic() + 60)  # a whole response: made is enough
        scheduler.submit(whole, lambda job: None)
        whole.finish()
        assert scheduler.in_flight == 0

    asyncio.run(scenario())


def test_disconnect_stops_a_stream(busy, slow, preset):
    before_closed, before_completed = slow.closed, slow.completed
    cancelled = gauge(busy, "cosyvoice_cancelled_total")
    with (
        busy.client() as own,
        own.stream(
            "POST",
            "/tts",
            json={"text": LONG, "speaker": preset, "stream": True, "format": "pcm", "seed": 1},
        ) as response,
    ):
        assert response.status_code == 200
        next(response.iter_raw())  # first audio arrived; now hang up
    assert wait_for(lambda: slow.closed == before_closed + 1, timeout=30), "synthesis kept running"
    assert slow.completed == before_completed  # stopped before the end
    assert wait_for(lambda: gauge(busy, "cosyvoice_requests_in_flight") == 0, timeout=10)
    assert gauge(busy, "cosyvoice_cancelled_total") == cancelled + 1
    assert wait_for(lambda: live_jobs() == 0, timeout=10), "the cancelled job is still in memory"
    assert wait_for(lambda: live_jobs() == 0, timeout=10), "the cancelled job is still in memory"


def live_jobs() -> int:
    """Jobs still referenced anywhere in this process (the servers run in threads here)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Job)


def _tts_statuses(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    statuses = {
        status: metric(text, "cosyvoice_requests_total", endpoint="/tts", status=status)
        for status in ("499", "500", "400", "422")
    }
    return {**statuses, "no_audio": metric(text, "cosyvoice_errors_total", code="no_audio")}


def test_disconnect_stops_a_whole_file_request(busy, slow, preset):
    """...and a client that leaves is recorded as 499 (nginx's "client closed request"): it had
    been a 500 no_audio, or a 400/422 when it left while sending its body, so every client that
    gave up raised the server's error rates."""
    before_closed, before_completed = slow.closed, slow.completed
    cancelled = gauge(busy, "cosyvoice_cancelled_total")
    before = _tts_statuses(busy)
    with busy.client(timeout=0.6) as own, pytest.raises(httpx.ReadTimeout):
        own.post("/tts", json={"text": LONG, "speaker": preset, "seed": 2})  # >= 2 s of pauses
    assert wait_for(lambda: slow.closed == before_closed + 1, timeout=30), "synthesis kept running"
    assert slow.completed == before_completed
    assert wait_for(lambda: gauge(busy, "cosyvoice_requests_in_flight") == 0, timeout=10)
    assert gauge(busy, "cosyvoice_cancelled_total") == cancelled + 1
    assert wait_for(lambda: live_jobs() == 0, timeout=10), "the cancelled job is still in memory"
    body = json.dumps({"text": LONG, "speaker": preset}).encode()
    head = (
        f"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for sent in (head, head + body[:20]):  # gone before its body, or in the middle of it
        with socket.create_connection(("127.0.0.1", busy.port), timeout=10) as raw:
            raw.sendall(sent)
            time.sleep(0.2)
    expected = {**before, "499": before["499"] + 3}
    assert wait_for(lambda: _tts_statuses(busy) == expected, timeout=10), _tts_statuses(busy)


def test_timeout_gives_504(engine, preset, tmp_path):
    slow = EngineProbe(engine, memo=True, split=4, delay=0.5)
    settings = Settings(request_timeout=0.7, voices_dir=tmp_path)
    with ServerThread(create_app(slow, settings)) as server, server.client() as client:
        response = client.post("/tts", json={"text": LONG, "speaker": preset, "seed": 1})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert wait_for(lambda: slow.closed == 1, timeout=30)
        assert slow.completed == 0
        assert metric(client.get("/metrics").text, "cosyvoice_timeouts_total") == 1


def test_background_loading(engine, preset, tmp_path):
    gate = threading.Event()

    def loader():
        gate.wait(30)
        return engine

    with (
        ServerThread(create_app(loader, Settings(voices_dir=tmp_path))) as server,
        server.client() as client,
    ):
        assert client.get("/health").json()["model"] == "loading"
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.headers["retry-after"]
        assert not_ready.json()["error"]["code"] == "model_loading"
        assert client.post("/tts", json={"text": "你好。", "speaker": preset}).status_code == 503
        assert client.get("/speakers").status_code == 503
        assert client.get("/info").json()["status"] == "loading"
        assert client.get("/voices").json()["data"] == []
        # a voice save too (it was a 500: the aliases it checks come from the model's voices)
        for path, field in (("/voices", "audio"), ("/v1/audio/voices", "audio_sample")):
            files = {field: ("p.wav", prompt_wav(1.0), "audio/wav")}
            saved = client.post(path, data={"name": "early", "prompt_text": "你好"}, files=files)
            assert saved.status_code == 503, saved.text
            assert saved.json()["error"]["code"] == "model_loading"
        assert metric(client.get("/metrics").text, "cosyvoice_model_loaded") == 0
        gate.set()
        assert wait_for(lambda: client.get("/ready").status_code == 200, timeout=10)
        assert client.post("/tts", json={"text": "你好。", "speaker": preset}).status_code == 200


def test_a_loading_server_is_ready_once_warm(engine, preset, tmp_path):
    """The engine's background warm-up after a load (its flow's graphs traced: ~20 s for a
    full-size CosyVoice2 on 2 AVX2 cores) is part of loading: a request before it would wait for
    it all the same, so /ready sends a load balancer elsewhere until it is over."""
    gate = threading.Event()
    traced = engine.graphs_traced

    def loader():
        # warm-up work that takes a while, as a slow CPU's traces do
        engine.graphs_traced = engine.loop.background(lambda: gate.wait(30))
        return engine

    try:
        with (
            ServerThread(create_app(loader, Settings(voices_dir=tmp_path))) as server,
            server.client() as client,
        ):
            assert wait_for(lambda: engine.graphs_traced is not traced, timeout=10)
            not_ready = client.get("/ready")
            assert not_ready.status_code == 503
            assert not_ready.json()["error"]["code"] == "model_loading"
            gate.set()
            assert wait_for(lambda: client.get("/ready").status_code == 200, timeout=10)
            assert (
                client.post("/tts", json={"text": "你好。", "speaker": preset}).status_code == 200
            )
    finally:
        gate.set()
        engine.graphs_traced = traced


def test_failed_loading_is_reported(tmp_path):
    def loader():
        raise ModelDirError("llm.pt is missing")

    with (
        ServerThread(create_app(loader, Settings(voices_dir=tmp_path))) as server,
        server.client() as client,
    ):
        assert wait_for(lambda: client.get("/health").json()["model"] == "failed", timeout=10)
        response = client.get("/ready")
        assert (
            response.status_code == 503
            and "llm.pt is missing" in response.json()["error"]["message"]
        )
        assert (
            client.post("/tts", json={"text": "x", "speaker": "y"}).json()["error"]["code"]
            == "model_failed"
        )
    # with a key, the public /ready and /info do not show the load error's text (its paths)
    keyed = Settings(voices_dir=tmp_path, api_key="k")
    with ServerThread(create_app(loader, keyed)) as server, server.client() as client:
        assert wait_for(lambda: client.get("/health").json()["model"] == "failed", timeout=10)
        assert (
            "llm.pt" not in client.get("/ready").text and "llm.pt" not in client.get("/info").text
        )
        refused = client.post(
            "/tts", json={"text": "x", "speaker": "y"}, headers={"Authorization": "Bearer k"}
        )
        assert "llm.pt is missing" in refused.json()["error"]["message"]  # with the key: all


def test_api_key_and_cors(engine, preset, tmp_path):
    settings = Settings(api_key="s3cret", cors_origins=["http://app.test"], voices_dir=tmp_path)
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        body = {"text": "你好。", "speaker": preset}
        for path in ("/health", "/ready", "/info", "/"):
            assert client.get(path).status_code == 200, path
        assert client.get("/info").json()["auth_required"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            refused = client.post("/tts", json=body, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "invalid_api_key"
        for path in ("/metrics", "/voices", "/speakers", "/v1/models"):
            assert client.get(path).status_code == 401, path
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/tts", json=body, headers=good).status_code == 200
        allowed = {**good, "Sec-Fetch-Site": "cross-site", "Origin": "http://app.test"}
        assert client.post("/tts", json=body, headers=allowed).status_code == 200  # --cors-origin
        assert client.get("/metrics", headers=good).status_code == 200

        openai = pytest.importorskip("openai")
        ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert ok.audio.speech.create(model="tts-1", voice=preset, input="你好。").read()
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.audio.speech.create(model="tts-1", voice=preset, input="你好。")

        preflight = {
            "Origin": "http://app.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        allowed = client.options("/tts", headers=preflight)
        assert allowed.status_code == 200
        # the OpenAI JS SDK (Stainless) sends headers of its own on every call from a browser
        sdk = "authorization,content-type,x-stainless-lang,x-stainless-os,openai-organization"
        stainless = client.options(
            "/v1/audio/speech", headers={**preflight, "Access-Control-Request-Headers": sdk}
        )
        assert stainless.status_code == 200, stainless.text
        assert "x-stainless-lang" in stainless.headers["access-control-allow-headers"].lower()
        assert allowed.headers["access-control-allow-origin"] == "http://app.test"
        other = client.options("/tts", headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
        simple = client.get("/health", headers={"Origin": "http://app.test"})
        assert simple.headers["access-control-allow-origin"] == "http://app.test"
        assert "x-sample-rate" in simple.headers["access-control-expose-headers"].lower()


def test_cors_preflights_are_logged_counted_and_answered_as_json(engine, tmp_path, caplog):
    """CORS's middleware was outermost: its preflights never reached the access log, the
    metrics or X-Request-Id, and a refused one was a plain-text "Disallowed CORS origin"."""
    import logging

    from test_server_support import metric

    settings = Settings(api_key="k", cors_origins=["http://app.test"], voices_dir=tmp_path)
    preflight = {
        "Origin": "http://app.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with (
        ServerThread(create_app(engine, settings)) as server,
        server.client() as client,
        caplog.at_level(logging.INFO, logger="cosyvoice_lite.serving.access"),
    ):
        allowed = client.options("/tts", headers={**preflight, "X-Request-Id": "pre-1"})
        assert allowed.status_code == 200 and allowed.headers["x-request-id"] == "pre-1"
        assert allowed.headers["access-control-allow-origin"] == "http://app.test"
        refused = client.options("/tts", headers={**preflight, "Origin": "http://evil.test"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "cors_refused"
        assert "origin" in refused.json()["error"]["message"] and refused.headers["x-request-id"]
        assert "access-control-allow-origin" not in refused.headers
        # an answer given before the routes (a wrong key) still tells the page what it is
        wrong = client.post("/tts", json={}, headers={"Origin": "http://app.test"})
        assert wrong.status_code == 401
        assert wrong.headers["access-control-allow-origin"] == "http://app.test"
        text = client.get("/metrics", headers={"Authorization": "Bearer k"}).text
    for status in ("200", "400"):
        assert metric(text, "cosyvoice_requests_total", method="OPTIONS", status=status) == 1
    assert metric(text, "cosyvoice_errors_total", code="cors_refused") == 1
    logged = [r for r in caplog.records if getattr(r, "method", None) == "OPTIONS"]
    assert [r.status for r in logged] == [200, 400] and logged[0].request_id == "pre-1"


def test_metrics_name_routes_not_paths(engine, tmp_path, caplog):
    """Paths a client makes up (with or without the key) were each a new series for good (1,000
    requests: 1,012 series, 1.1 MB a scrape); HEAD probes were 'unmatched' and logged at INFO;
    refused keys were missing from errors_total."""
    import logging
    import uuid

    from test_server_support import metric

    settings = Settings(api_key="k", voices_dir=tmp_path)
    good = {"Authorization": "Bearer k"}
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        for _ in range(20):
            client.get(f"/v1/models/{uuid.uuid4().hex}")
            client.delete(f"/v1/audio/voices/{uuid.uuid4().hex}", headers=good)
        with caplog.at_level(logging.INFO, logger="cosyvoice_lite.serving.access"):
            assert client.head("/health").status_code == 200
        text = client.get("/metrics", headers=good).text
    series = [line for line in text.splitlines() if line.startswith("cosyvoice_requests_total")]
    assert len(series) <= 6, series
    assert metric(text, "cosyvoice_requests_total", endpoint="/v1/models/{model}", status="401")
    assert metric(text, "cosyvoice_requests_total", endpoint="/health", method="HEAD") == 1
    assert metric(text, "cosyvoice_errors_total", code="invalid_api_key") == 20
    assert not [r for r in caplog.records if "HEAD /health" in r.getMessage()]


def test_voices_survive_a_restart(engine, tmp_path):
    voices = tmp_path / "voices"
    first = EngineProbe(engine)
    with (
        ServerThread(create_app(first, Settings(voices_dir=voices))) as server,
        server.client() as client,
    ):
        created = client.post(
            "/voices",
            data={"name": "keeper", "prompt_text": "希望你以后能够做的比我还好呦。"},
            files={"audio": ("p.wav", prompt_wav(2.0), "audio/wav")},
        )
        assert created.status_code == 201
        before = client.post(
            "/tts", json={"text": "你好。", "speaker": "keeper", "seed": 9}
        ).content
    assert first.encodes == 1

    second = EngineProbe(engine, memo=False)
    with (
        ServerThread(create_app(second, Settings(voices_dir=voices))) as server,
        server.client() as client,
    ):
        assert [v["name"] for v in client.get("/voices").json()["data"]] == ["keeper"]
        after = client.post("/tts", json={"text": "你好。", "speaker": "keeper", "seed": 9}).content
    assert after == before and len(after) > 44
    assert second.encodes == 0  # features came from disk, not recomputed


def test_serve_command(v1_dir, tmp_path):
    """`cosyvoice-lite serve` in a subprocess: health at once, ready after loading, JSON logs."""
    port = free_port()
    command = serve_argv(
        v1_dir, port, tmp_path / "voices", "--max-text-chars", "50",
        "--outputs-dir", str(tmp_path / "out"),
    )  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy(), text=True
    )
    url = f"http://127.0.0.1:{port}"

    def get(path):
        try:
            return httpx.get(url + path, timeout=5)
        except httpx.TransportError:
            return None

    try:
        assert wait_for(lambda: get("/health"), timeout=90), "server did not start"
        assert wait_for(
            lambda: (r := get("/ready")) is not None and r.status_code == 200, timeout=120
        )
        info = get("/info").json()
        assert info["limits"]["max_text_chars"] == 50
        voice = get("/speakers").json()["speakers"][0]["name"]
        response = httpx.post(url + "/tts", json={"text": "你好。", "speaker": voice}, timeout=60)
        assert response.status_code == 200 and response.content[:4] == b"RIFF"
        assert wait_for(lambda: list((tmp_path / "out").glob("*/*.json")), timeout=10)
    finally:
        output = interrupted_output(process)
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("path") == "/tts"]
    assert (
        access
        and access[0]["status"] == 200
        and access[0]["request_id"]
        and access[0]["duration_ms"] >= 0
    )
    assert process.returncode == 0, output


def test_instruct_and_base_releases(v1_variants, tmp_path):
    """-Instruct takes instructions with its preset voices; the base release has no presets and
    works with saved voices only."""
    instruct = tiny_engine(v1_variants["instruct"])
    voice = instruct.voices()[0]
    with (
        ServerThread(create_app(instruct, Settings(voices_dir=tmp_path / "a"))) as server,
        server.client() as client,
    ):
        info = client.get("/info").json()["model"]
        assert info["instruct"] and info["instruct_needs_preset"]
        ok = client.post(
            "/tts",
            json={"text": "你好。", "speaker": voice, "instruct": "用开心的语气说", "seed": 1},
        )
        assert ok.status_code == 200 and len(ok.content) > 44
        speech = client.post(
            "/v1/audio/speech",
            json={
                "model": "tts-1",
                "input": "你好。",
                "voice": voice,
                "instructions": "用开心的语气说",
                "response_format": "wav",
                "seed": 1,
            },
        )
        assert (decode(speech.content)[0] == decode(ok.content)[0]).all()
        client.post(
            "/voices",
            data={"name": "mine", "prompt_text": "你好。"},
            files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
        )
        refused = client.post(
            "/tts", json={"text": "你好。", "speaker": "mine", "instruct": "开心"}
        )
        assert refused.status_code == 400 and "preset voices" in refused.json()["error"]["message"]

    base = tiny_engine(v1_variants["base"])
    with (
        ServerThread(create_app(base, Settings(voices_dir=tmp_path / "b"))) as server,
        server.client() as client,
    ):
        assert client.get("/speakers").json()["speakers"] == []
        missing = client.post("/tts", json={"text": "你好。", "speaker": "中文女"})
        assert missing.status_code == 404
        created = client.post(
            "/voices",
            data={"name": "mine", "prompt_text": "你好。"},
            files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
        )
        assert created.status_code == 201
        assert client.post("/tts", json={"text": "你好。", "speaker": "mine"}).status_code == 200


def test_a_full_temporary_directory_is_507_not_500(v1_dir, tmp_path):
    """An upload spooled past its first MB to TMPDIR, which fills (here: a file-size limit on
    the server process): it was a generic 500 with two tracebacks in the log; it is the server's
    storage condition, 507 as for its voice storage, and the server goes on."""
    import resource

    port = free_port()

    def small_files() -> None:  # (in the server process only)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG

    process = subprocess.Popen(
        serve_argv(v1_dir, port, tmp_path / "voices"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=small_files,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: status_of(url + "/ready") == 200, timeout=120)
        big = prompt_wav(seconds=25, rate=48000)  # 2.4 MB of 16-bit samples
        response = httpx.post(
            url + "/tts/upload",
            data={"text": "你好。"},
            files={"prompt_wav": ("a.wav", big, "audio/wav")},
            timeout=60,
        )
        assert response.status_code == 507, response.text
        assert response.json()["error"]["code"] == "insufficient_storage"
        assert status_of(url + "/health") == 200
    finally:
        output = interrupted_output(process)
    assert "Traceback" not in output, output[-3000:]
