"""The speech server, started for real (uvicorn on a loopback port) with the tiny v1 model:
every endpoint, every error, formats, streaming, SSE, the real `openai` client, the voice library
and concurrent requests.

One server serves the whole module. Its engine is the real tiny engine behind ``EngineProbe``,
which replays seeded results it has already synthesized (so that five formats of one sentence cost
one synthesis) and hands each chunk out in three pieces (so that streaming is observable). The
concurrency test switches replay off."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from test_server_support import (
    EngineProbe,
    ServerThread,
    decode,
    metric,
    prompt_wav,
    tiny_engine,
    wait_for,
)

from cosyvoice_lite.serving import Settings, create_app

TEXT = "你好。"
TWO_SENTENCES = "你好。今天天气很好。"


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture(scope="module")
def probe(engine):
    return EngineProbe(engine, memo=True, split=3, delay=0.05)


@pytest.fixture(scope="module")
def server(probe, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    settings = Settings(
        max_text_chars=60,
        workers=2,
        max_queue=8,
        voices_dir=root / "voices",
        outputs_dir=root / "outputs",
        max_upload_bytes=400_000,
        max_prompt_seconds=8,
    )
    with ServerThread(create_app(probe, settings)) as running:
        running.root = root
        yield running


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def preset(engine) -> str:
    return engine.voices()[0]


def tts(client, **body):
    return client.post("/tts", json=body)


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------------------- operations


def test_health_ready_info(client, engine):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/ready").json() == {"status": "ready", "model": engine.model.name}
    info = client.get("/info").json()
    assert info["model"]["sample_rate"] == 22050 and info["model"]["version"] == 1
    assert "preset" in info["model"]["modes"] and not info["model"]["instruct"]
    assert info["limits"]["max_text_chars"] == 60 and info["auth_required"] is False


def test_speakers_lists_presets(client, engine):
    body = client.get("/speakers").json()
    presets = [s["name"] for s in body["speakers"] if s["kind"] == "preset"]
    assert presets == engine.voices()
    assert body["modes"] == [m.value for m in engine.modes]


def test_no_cors_headers_unless_configured(client):
    response = client.get("/health", headers={"Origin": "http://elsewhere.test"})
    assert "access-control-allow-origin" not in response.headers


def test_another_sites_page_cannot_write_to_a_keyless_server(client, preset):
    """A form or a no-cors fetch from any page the user visits needs no CORS preflight: it had
    saved voices on (and filled the library of) a keyless server on their machine."""
    files = {"audio": ("p.wav", b"RIFF", "audio/wav")}
    for site in ("cross-site", "same-site"):
        headers = {"Sec-Fetch-Site": site, "Origin": "http://evil.test"}
        refused = client.post("/voices", data={"name": "planted"}, files=files, headers=headers)
        assert_error(refused, 403, "cross_site_refused")
        body = {"text": TEXT, "speaker": preset}
        assert_error(client.post("/tts", json=body, headers=headers), 403, "cross_site_refused")
    assert "planted" not in client.get("/voices").text
    own = {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1"}  # the page itself
    assert client.post("/tts", json={"text": TEXT, "speaker": preset}, headers=own).is_success
    reads = client.get("/voices", headers={"Sec-Fetch-Site": "cross-site"})  # reads: CORS's
    assert reads.status_code == 200


def test_a_server_with_allowed_hosts_answers_no_other_host_name(engine, tmp_path):
    """A site whose name is rebound to 127.0.0.1 (DNS rebinding) sends its own name as Host:
    a loopback server (allowed_hosts, the CLI's default there) had answered it, voices and
    their recordings included."""
    settings = Settings(voices_dir=tmp_path, allowed_hosts=["localhost", "127.0.0.1", "::1"])
    with ServerThread(create_app(engine, settings)) as running, running.client() as c:
        assert c.get("/voices").status_code == 200  # Host: 127.0.0.1:<port>
        for host in ("attacker.example:8080", "attacker.example", "127.0.0.1.evil.test"):
            assert_error(c.get("/voices", headers={"Host": host}), 400, "unknown_host")
        for host in ("localhost:1", "[::1]:8080", "LOCALHOST", "localhost.:8080"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        # an HTTP/1.0 probe names no Host (HAProxy's httpchk, nc): answered as before
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw:
            raw.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")


# ---------------------------------------------------------------------------------- /tts


def test_tts_default_is_wav(client, preset, server):
    response = tts(client, text=TEXT, speaker=preset, seed=1)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    audio, rate = decode(response.content)
    assert rate == 22050 and len(audio) > 0
    assert abs(float(response.headers["x-audio-duration"]) - len(audio) / rate) < 1e-3
    assert response.headers["x-request-id"]
    # The outputs directory keeps the result: audio + JSON metadata.
    request_id = response.headers["x-request-id"]
    outputs = server.root / "outputs"
    metas = wait_for(lambda: list(outputs.glob(f"*/*{request_id}.json")))
    assert metas, "result was not saved"
    meta = json.loads(metas[0].read_text())
    assert meta["text"] == TEXT and meta["voice"] == preset and meta["mode"] == "preset"
    saved, _ = decode(metas[0].with_suffix(".wav").read_bytes())
    assert len(saved) == len(audio)


@pytest.mark.parametrize(
    "fmt,rate", [("mp3", 22050), ("flac", 22050), ("opus", 48000), ("ogg", 22050), ("pcm", 22050)]
)
def test_tts_formats(client, preset, fmt, rate):
    response = tts(client, text=TEXT, speaker=preset, seed=1, format=fmt)
    assert response.status_code == 200, response.text
    assert int(response.headers["x-sample-rate"]) == rate
    if fmt == "pcm":
        assert response.headers["content-type"] == "audio/pcm"
        samples = np.frombuffer(response.content, "<i2")
        assert len(samples) > 0
        assert abs(float(response.headers["x-audio-duration"]) - len(samples) / rate) < 1e-3
    else:
        audio, got = decode(response.content)
        assert got == rate and len(audio) > 0


def test_tts_streaming_matches_chunks(client, preset):
    """Streamed WAV and PCM arrive in several pieces and decode to the same audio."""
    pieces = []
    with client.stream(
        "POST",
        "/tts",
        json={"text": TWO_SENTENCES, "speaker": preset, "seed": 3, "stream": True, "format": "wav"},
    ) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        for piece in response.iter_raw():
            pieces.append(piece)
    assert len(pieces) >= 2
    data = b"".join(pieces)
    assert data[:4] == b"RIFF" and data[40:44] == b"\xff\xff\xff\xff"
    wav, rate = decode(data)
    pcm = tts(client, text=TWO_SENTENCES, speaker=preset, seed=3, stream=True, format="pcm")
    assert pcm.status_code == 200
    samples = np.frombuffer(pcm.content, "<i2").astype(np.float32) / 32768
    assert rate == 22050 and len(samples) == len(wav)
    np.testing.assert_allclose(samples, wav, atol=1e-4)


def test_tts_speed_with_stream_falls_back_to_whole_sentences(client, preset):
    slow = tts(client, text=TEXT, speaker=preset, seed=1, speed=0.5, stream=True, format="pcm")
    normal = tts(client, text=TEXT, speaker=preset, seed=1, format="pcm")
    assert slow.status_code == normal.status_code == 200
    assert len(slow.content) > 1.5 * len(normal.content)


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"text": TEXT, "speaker": "nobody"}, 404, "voice_not_found"),
        ({"text": "字" * 61, "speaker": "{preset}"}, 400, "text_too_long"),
        ({"text": "   ", "speaker": "{preset}"}, 400, "empty_text"),
        (
            {"text": TEXT, "speaker": "{preset}", "instruct": "speak happily"},
            400,
            "unsupported_mode",
        ),
        ({"text": TEXT, "speaker": "{preset}", "speed": 9}, 400, "invalid_request"),
        ({"text": TEXT, "speaker": "{preset}", "mode": "zero_shot"}, 400, "invalid_request"),
        ({"text": TEXT, "speaker": "{preset}", "format": "aiff"}, 422, "invalid_request"),
        ({"text": TEXT, "speaker": "{preset}", "colour": "blue"}, 422, "invalid_request"),
        ({"text": TEXT}, 422, "invalid_request"),
        ({"text": 5, "speaker": "{preset}"}, 422, "invalid_request"),
    ],
)
def test_tts_errors(client, preset, body, status, code):
    body = {k: (preset if v == "{preset}" else v) for k, v in body.items()}
    error = assert_error(tts(client, **body), status, code)
    if code == "unsupported_mode":
        assert error["supported_modes"] == ["preset", "zero_shot", "cross_lingual", "vc"]
        assert "preset" in error["message"]
    if code == "text_too_long":
        assert error["param"] == "text" and "60" in error["message"]


def test_malformed_requests_are_json_errors(client):
    assert_error(
        client.post("/tts", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_error(
        client.post("/tts", content=b"[1, 2]", headers={"content-type": "application/json"}), 422
    )
    assert_error(client.get("/no/such/page"), 404)
    assert_error(client.get("/tts"), 405)
    assert_error(client.delete("/speakers"), 405)


# ---------------------------------------------------------------------------------- OpenAI API


def test_models(client, engine):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == engine.model.name


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "pcm"])
def test_openai_client_formats(openai_client, client, preset, fmt):
    result = openai_client.audio.speech.create(
        model="tts-1", voice=preset, input=TEXT, response_format=fmt, extra_body={"seed": 1}
    )
    data = result.read()
    if fmt == "pcm":  # OpenAI's pcm: 24 kHz 16-bit mono, so the 22.05 kHz model is resampled
        samples = np.frombuffer(data, "<i2")
        wav, _ = decode(
            openai_client.audio.speech.create(
                model="tts-1",
                voice=preset,
                input=TEXT,
                response_format="wav",
                extra_body={"seed": 1},
            ).read()
        )
        assert abs(len(samples) - len(wav) * 24000 / 22050) <= 1
    else:
        audio, rate = decode(data)
        assert len(audio) > 0 and rate in (22050, 48000)
    if fmt == "wav":  # streamed by chunks here, one whole file from /tts: the same samples
        whole, _ = decode(
            client.post("/tts", json={"text": TEXT, "speaker": preset, "seed": 1}).content
        )
        np.testing.assert_array_equal(audio, whole)


def test_openai_client_streaming_response(openai_client, preset):
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice=preset,
        input=TWO_SENTENCES,
        response_format="wav",
        extra_body={"seed": 3, "stream": True},
    ) as response:
        pieces = list(response.iter_bytes(64))
    assert len(pieces) >= 2
    audio, rate = decode(b"".join(pieces))
    assert rate == 22050 and len(audio) > 0


def test_openai_sse(openai_client, preset, client):
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice=preset,
        input=TWO_SENTENCES,
        response_format="pcm",
        stream_format="sse",
        extra_body={"seed": 3},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    types = [e["type"] for e in events]
    assert types[-1] == "speech.audio.done" and set(types[:-1]) == {"speech.audio.delta"}
    assert len(types) >= 3  # streamed in several deltas
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    usage = events[-1]["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    # Same seed, same engine streaming: the plain stream carries the same samples.
    plain = client.post(
        "/v1/audio/speech",
        json={
            "model": "tts-1",
            "voice": preset,
            "input": TWO_SENTENCES,
            "response_format": "pcm",
            "stream": True,
            "seed": 3,
        },
    )
    assert plain.content == audio


def test_whole_and_streamed_audio_offer_a_file_name(client, preset):
    """Every audio answer names its file (curl -OJ saves by it), streamed ones too: /v1's
    default mp3 and its pcm are chunked always, and had none. An SSE answer names none."""

    def speech(**body):
        body = {"model": "tts-1", "voice": preset, "input": TEXT, "seed": 1, **body}
        return client.post("/v1/audio/speech", json=body)

    answers = {
        "mp3": speech(),
        "pcm": speech(response_format="pcm", stream=False),
        "ogg": speech(response_format="opus"),
        "flac": speech(response_format="flac", stream=True),
        "wav": tts(client, text=TEXT, speaker=preset, seed=1, stream=True, format="wav"),
    }
    for ext, response in answers.items():
        assert response.status_code == 200, response.text
        assert "content-length" not in response.headers  # each one streamed
        name = f"speech-{response.headers['x-request-id']}.{ext}"
        assert response.headers["content-disposition"] == f'inline; filename="{name}"'
    whole = tts(client, text=TEXT, speaker=preset, seed=1, format="flac")
    assert "content-length" in whole.headers
    name = f"speech-{whole.headers['x-request-id']}.flac"
    assert whole.headers["content-disposition"] == f'inline; filename="{name}"'
    sse = speech(response_format="pcm", stream_format="sse")
    assert sse.headers["content-type"].startswith("text/event-stream")
    assert "content-disposition" not in sse.headers


def test_openai_voice_object_and_instructions_errors(openai_client, preset):
    import openai

    result = openai_client.audio.speech.create(
        model="tts-1",
        voice={"id": preset},
        input=TEXT,
        response_format="wav",
        extra_body={"seed": 1},
    )
    assert decode(result.read())[0].size > 0
    with pytest.raises(openai.NotFoundError, match="unknown voice"):
        openai_client.audio.speech.create(model="tts-1", voice="no-such-voice", input=TEXT)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        openai_client.audio.speech.create(model="CosyVoice2-0.5B", voice=preset, input=TEXT)
    with pytest.raises(openai.BadRequestError, match="aac"):
        openai_client.audio.speech.create(
            model="tts-1", voice=preset, input=TEXT, response_format="aac"
        )
    with pytest.raises(openai.BadRequestError, match="supports: preset"):
        openai_client.audio.speech.create(
            model="tts-1", voice=preset, input=TEXT, instructions="whisper"
        )
    with pytest.raises(openai.BadRequestError, match="too long"):
        openai_client.audio.speech.create(model="tts-1", voice=preset, input="a" * 61)
    # the same 400 as /tts gives (it was a schema 422 here)
    with pytest.raises(openai.BadRequestError, match="speed"):
        openai_client.audio.speech.create(model="tts-1", voice=preset, input=TEXT, speed=10)


# ---------------------------------------------------------------------------------- voice library


def upload(
    client, name, audio=None, prompt_text="希望你以后能够做的比我还好呦。", filename="p.wav"
):
    files = {"audio": (filename, audio if audio is not None else prompt_wav(2.0), "audio/wav")}
    return client.post("/voices", data={"name": name, "prompt_text": prompt_text}, files=files)


def test_voice_library_lifecycle(client, preset, server, openai_client):
    created = upload(client, "clone-a")
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["id"] == "clone-a" and voice["kind"] == "saved" and voice["duration"] == 2.0
    assert client.get("/voices/clone-a").json() == voice
    assert voice in client.get("/voices").json()["data"]
    assert voice in client.get("/v1/audio/voices").json()["data"]
    speakers = {s["name"]: s["kind"] for s in client.get("/speakers").json()["speakers"]}
    assert speakers["clone-a"] == "saved" and speakers[preset] == "preset"
    stored, rate = decode(client.get("/voices/clone-a/audio").content)
    assert rate == 16000 and len(stored) == 32000
    assert (server.root / "voices" / "clone-a" / "features" / "v1-22050.pt").is_file()

    # usable by name in both APIs (zero-shot with the transcript)
    response = tts(client, text=TEXT, speaker="clone-a", seed=1)
    assert response.status_code == 200 and decode(response.content)[0].size > 0
    again = tts(client, text=TEXT, speaker="clone-a", seed=1)
    assert again.content == response.content
    speech = openai_client.audio.speech.create(
        model="tts-1", voice="clone-a", input=TEXT, response_format="wav", extra_body={"seed": 1}
    )
    assert decode(speech.read())[0].size > 0
    # a saved voice cannot take instructions on v1, and cannot be forced into preset mode
    assert_error(tts(client, text=TEXT, speaker="clone-a", instruct="sadly"), 400)
    assert_error(tts(client, text=TEXT, speaker="clone-a", mode="preset"), 400)
    assert tts(client, text=TEXT, speaker="clone-a", mode="cross_lingual").status_code == 200

    deleted = client.delete("/voices/clone-a")
    assert deleted.json() == {"id": "clone-a", "object": "audio.voice", "deleted": True}
    assert_error(client.get("/voices/clone-a"), 404, "voice_not_found")
    assert_error(client.delete("/voices/clone-a"), 404, "voice_not_found")
    assert_error(tts(client, text=TEXT, speaker="clone-a"), 404, "voice_not_found")
    assert not (server.root / "voices" / "clone-a").exists()


def test_voice_without_transcript_is_cross_lingual(client):
    assert upload(client, "no-text", prompt_text="").status_code == 201
    response = tts(client, text=TEXT, speaker="no-text", seed=1)
    assert response.status_code == 200
    assert_error(tts(client, text=TEXT, speaker="no-text", mode="zero_shot"), 400)
    client.delete("/voices/no-text")


def test_voice_upload_errors(client, preset):
    assert upload(client, "taken").status_code == 201
    taken = upload(client, "taken")
    assert_error(taken, 409, "voice_exists")
    # OpenAI's SDKs send a 409 twice more unless told a retry would meet the same answer
    assert taken.headers["x-should-retry"] == "false"
    assert_error(upload(client, preset), 409, "voice_exists")
    assert_error(upload(client, "../escape"), 400, "invalid_name")
    assert_error(upload(client, "bad/name"), 400, "invalid_name")
    assert_error(upload(client, ".hidden"), 400, "invalid_name")
    assert_error(
        upload(client, "junk", audio=b"definitely not audio"), 415, "unsupported_audio_format"
    )
    assert_error(upload(client, "empty", audio=b""), 400, "invalid_audio")
    assert_error(upload(client, "short", audio=prompt_wav(0.2)), 400, "invalid_audio")
    assert_error(
        upload(client, "silent", audio=prompt_wav(2.0, amplitude=0.0)), 400, "invalid_audio"
    )
    assert_error(upload(client, "lowrate", audio=prompt_wav(2.0, rate=8000)), 400, "invalid_audio")
    assert_error(
        upload(client, "huge", audio=prompt_wav(20.0, rate=16000)), 413, "upload_too_large"
    )
    too_long = assert_error(
        upload(client, "long", audio=prompt_wav(9.0, rate=16000)), 400, "invalid_audio"
    )
    assert "too long" in too_long["message"] and "8 s" in too_long["message"]
    assert_error(
        client.post("/voices", files={"audio": ("p.wav", prompt_wav(1.0), "audio/wav")}),
        400,
        "missing_field",
    )
    assert_error(client.post("/voices", files={"name": (None, "x")}), 400, "missing_field")
    # a URL-encoded form is read, but cannot carry the recording
    assert_error(client.post("/voices", data={"name": "x"}), 400, "missing_field")
    assert_error(client.post("/voices", json={"name": "x"}), 415, "unsupported_media_type")
    assert_error(client.get("/voices/bad..name"), 400, "invalid_name")
    names = [v["name"] for v in client.get("/voices").json()["data"]]
    assert names == ["taken"]
    client.delete("/voices/taken")


def test_voice_from_mp3_and_flac(client):
    for fmt, name in (("MP3", "from-mp3"), ("FLAC", "from-flac"), ("OGG", "from-ogg")):
        data = prompt_wav(1.5, rate=22050, format=fmt)
        response = upload(client, name, audio=data, filename=f"p.{fmt.lower()}")
        assert response.status_code == 201, response.text
        assert abs(response.json()["duration"] - 1.5) < 0.1
    assert tts(client, text=TEXT, speaker="from-mp3", seed=1).status_code == 200
    for name in ("from-mp3", "from-flac", "from-ogg"):
        assert client.delete(f"/voices/{name}").status_code == 200


# ---------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_are_isolated(client, server, preset, probe):
    """Parallel requests (two workers) each get exactly what they get alone: no shared state."""
    probe.memo = False  # really synthesize every time
    texts = ["谢谢。", "再见。", "早上好。"]
    try:
        alone = [
            tts(client, text=t, speaker=preset, seed=i, stream=i % 2 == 1, format="pcm").content
            for i, t in enumerate(texts)
        ]
        results: dict[int, bytes] = {}
        run_parallel(server, texts, preset, results)
    finally:
        probe.memo = True
    assert [results[i] for i in range(len(texts))] == alone
    assert all(len(a) > 0 for a in alone)


def run_parallel(server, texts, preset, results) -> None:
    """Send one request per text at the same time, each on its own connection."""

    def run(i: int) -> None:
        with server.client() as own:
            response = tts(
                own, text=texts[i], speaker=preset, seed=i, stream=i % 2 == 1, format="pcm"
            )
            assert response.status_code == 200
            results[i] = response.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------- metrics


def test_metrics(client, preset):
    tts(client, text=TEXT, speaker=preset, seed=1)
    tts(client, text=TEXT, speaker="nobody")
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert (
        metric(text, "cosyvoice_requests_total", endpoint="/tts", method="POST", status="200") >= 1
    )
    assert (
        metric(text, "cosyvoice_requests_total", endpoint="/tts", method="POST", status="404") >= 1
    )
    assert metric(text, "cosyvoice_errors_total", code="voice_not_found") >= 1
    assert metric(text, "cosyvoice_real_time_factor_count") >= 1
    assert metric(text, "cosyvoice_first_audio_seconds_count") >= 1
    assert metric(text, "cosyvoice_audio_seconds_total") > 0
    assert metric(text, "cosyvoice_queue_depth") == 0
    assert metric(text, "cosyvoice_requests_in_flight") == 0
    assert metric(text, "cosyvoice_queue_capacity") == 10
    assert metric(text, "cosyvoice_model_loaded") == 1
    assert metric(text, "cosyvoice_outputs_saved_total") >= 1
    assert metric(text, "cosyvoice_cancelled_total") == 0  # every response here was read to the end
    assert "cosyvoice_model_info{" in text
    # the engine loop's batching, as counters (nothing concurrent here: no batch yet)
    assert "# TYPE cosyvoice_flow_stream_chunks_total counter" in text
    assert metric(text, "cosyvoice_flow_stream_chunks_total") >= metric(
        text, "cosyvoice_flow_calls_total"
    )
    assert metric(text, "cosyvoice_batched_decode_rows_total") >= 0


def test_request_id_is_echoed(client):
    assert (
        client.get("/health", headers={"X-Request-Id": "abc123"}).headers["x-request-id"]
        == "abc123"
    )
    assert (
        len(client.get("/health", headers={"X-Request-Id": "../bad id"}).headers["x-request-id"])
        == 16
    )
    # a proxy's or tracer's id (a UUID, dotted trace ids) is kept, so that logs correlate
    for given in ("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "trace.42_a"):
        assert client.get("/health", headers={"X-Request-Id": given}).headers["x-request-id"] == (
            given
        )
    for bad in ("-leading-dash", "a" * 65, "a/b"):
        assert client.get("/health", headers={"X-Request-Id": bad}).headers["x-request-id"] != bad


def test_docs_and_page_are_served(client):
    assert client.get("/openapi.json").json()["paths"]["/v1/audio/speech"]
    page = client.get("/")
    assert page.status_code == 200 and "cosyvoice-lite" in page.text
    for asset in (
        "/static/app.js",
        "/static/style.css",
        "/static/recorder-worklet.js",
        "/favicon.ico",
    ):
        assert client.get(asset).status_code == 200, asset


def test_first_audio_arrives_before_the_end(server, preset):
    """With streaming on, the first bytes come while synthesis is still going on."""
    with (
        server.client() as own,
        own.stream(
            "POST",
            "/tts",
            json={
                "text": TWO_SENTENCES,
                "speaker": preset,
                "stream": True,
                "format": "pcm",
                "seed": 3,
            },
        ) as response,
    ):
        start = time.monotonic()
        arrivals = [time.monotonic() - start for _ in response.iter_raw()]
    assert len(arrivals) >= 2 and arrivals[0] < arrivals[-1]


def test_http_errors_are_not_500(client, preset):
    """A sweep of odd inputs: none may produce a 500."""
    odd = [
        {"text": "\x00", "speaker": preset, "seed": 1},
        {"text": "<|endoftext|>", "speaker": preset, "seed": 1},
        {"text": "🙂", "speaker": preset, "seed": 1},
        {"text": "....", "speaker": preset, "seed": 1},
        {"text": TEXT, "speaker": ""},
        {"text": TEXT, "speaker": preset, "seed": -1},
        {"text": TEXT, "speaker": preset, "seed": 2**70},
        {"text": TEXT, "speaker": preset, "speed": 0},
    ]
    for body in odd:
        response = client.post("/tts", json=body)
        assert response.status_code < 500, (body, response.text)
    response = httpx.post(
        f"{client.base_url}/tts",
        content=b"\xff\xfe",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400


# ---------------------------------------------------------------------------------- logs


@pytest.fixture
def text_log():
    """The server's log as `serve --log-format text` writes it (logs.configure), in a buffer;
    the root logger is put back afterwards."""
    import io
    import logging

    from cosyvoice_lite.serving.logs import configure

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure(logging.INFO, json_lines=False)
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)
    yield buffer
    root.handlers[:], level = saved
    root.setLevel(level)


def test_text_log_lines_carry_the_request_fields(client, preset, text_log):
    """--log-format text had dropped every structured field: an access line was only
    "POST /tts 200", with no request id to match the response's X-Request-Id, no duration."""
    ok = client.post(
        "/tts", json={"text": TEXT, "speaker": preset, "seed": 1}, headers={"X-Request-Id": "t-42"}
    )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "t-42"
    client.get("/made%20up%0aINFO forged", headers={"X-Request-Id": "t-43"})  # a client's path
    lines = text_log.getvalue().splitlines()
    access = [line for line in lines if "serving.access: POST /tts 200" in line]
    assert len(access) == 1 and "request_id=t-42" in access[0], lines
    assert "duration_ms=" in access[0] and "status=200" in access[0]
    assert [line for line in lines if "synthesized" in line and "request_id=t-42" in line], lines
    made_up = [line for line in lines if "request_id=t-43" in line]
    # one line, the path's space quoted and its line break escaped
    assert len(made_up) == 1 and 'path="/made up\\\\x0aINFO forged"' in made_up[0], lines
    assert not [line for line in lines if line.startswith("INFO forged")]
    # nor can a path add a field of its own before the real ones (a logfmt parser keeps the first)
    client.get("/tts status=500 request_id=victim", headers={"X-Request-Id": "t-44"})
    forged = [line for line in text_log.getvalue().splitlines() if "request_id=t-44" in line]
    assert len(forged) == 1 and " status=500" not in forged[0].split('"')[0], forged


def test_voice_created_log_names_the_request(client, caplog):
    """The "voice created" line had no request_id (the synthesis lines have it)."""
    import logging

    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.serving"):
        created = client.post(
            "/voices",
            data={"name": "logged", "prompt_text": "希望你以后能够做的比我还好呦。"},
            files={"audio": ("p.wav", prompt_wav(2.0), "audio/wav")},
            headers={"X-Request-Id": "save-trace-1"},
        )
    assert created.status_code == 201, created.text
    client.delete("/voices/logged")
    logged = [r for r in caplog.records if r.getMessage() == "voice created"]
    assert [getattr(r, "request_id", None) for r in logged] == ["save-trace-1"]
