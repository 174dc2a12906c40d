"""Every mode over HTTP with the prompt in the request (issue 10): multipart ``/tts/upload``,
``ref_audio``/``ref_text`` on ``/v1/audio/speech`` (real ``openai`` client), voice conversion,
instruct with a one-off prompt (CosyVoice2), the prompt-feature cache, OpenAI voices and model
aliases, long input streamed segment by segment, and the offline ``/docs``. Real uvicorn servers
on loopback ports with the tiny random-weight models."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_server_support import EngineProbe, ServerThread, decode, metric, prompt_wav, tiny_engine

from cosyvoice_lite.serving import Settings, create_app

DATA = Path(__file__).resolve().parent / "data"
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "你好。"


@pytest.fixture(scope="module")
def probe(v1_dir):
    # a short pause before each chunk keeps the chunks of a stream apart on the wire
    return EngineProbe(tiny_engine(v1_dir), memo=True, delay=0.05)


@pytest.fixture(scope="module")
def server(probe, tmp_path_factory):
    settings = Settings(
        voices_dir=tmp_path_factory.mktemp("modes-voices"),
        max_upload_bytes=400_000,
        max_prompt_seconds=8,
        voice_aliases={"nova": "日语男"},
    )
    with ServerThread(create_app(probe, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def upload(client, prompt: bytes | None = None, source: bytes | None = None, **fields):
    files = {}
    if prompt is not None:
        files["prompt_wav"] = ("me.wav", prompt, "audio/wav")
    if source is not None:
        files["source_wav"] = ("src.wav", source, "audio/wav")
    return client.post("/tts/upload", data={k: str(v) for k, v in fields.items()}, files=files)


def streamed_flac(seconds: float) -> bytes:
    """A FLAC whose header does not say its length (as a streamed FLAC's): only decoding finds
    it. STREAMINFO's 36-bit sample count (bytes 21-25 of the file) is zero."""
    flac = bytearray(prompt_wav(seconds, format="FLAC"))
    flac[21] &= 0xF0
    flac[22:26] = bytes(4)
    assert sf.info(io.BytesIO(bytes(flac))).frames == 2**63 - 1  # "unknown" to libsndfile
    return bytes(flac)


def data_uri(audio: bytes) -> str:
    return "data:audio/wav;base64," + base64.b64encode(audio).decode()


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    return error


# ---------------------------------------------------------------------------------- /tts/upload


def test_zero_shot_upload_equals_saved_voice(client):
    """A one-off prompt gives exactly what the same prompt saved as a voice gives."""
    prompt = prompt_wav(2.0)
    oneoff = upload(client, prompt, text=TEXT, prompt_text=PROMPT_TEXT, seed=5)
    assert oneoff.status_code == 200, oneoff.text
    audio, rate = decode(oneoff.content)
    assert rate == 22050 and audio.size > 0
    created = client.post(
        "/voices",
        data={"name": "same", "prompt_text": PROMPT_TEXT},
        files={"audio": ("p.wav", prompt, "audio/wav")},
    )
    assert created.status_code == 201, created.text
    saved = client.post("/tts", json={"text": TEXT, "speaker": "same", "seed": 5})
    np.testing.assert_allclose(decode(saved.content)[0], audio, atol=1e-4)


def test_cross_lingual_and_prompt_cache(client, probe):
    prompt = prompt_wav(1.5, rate=24000)
    before = probe.encodes
    first = upload(client, prompt, text="Hello there.", seed=2)
    assert first.status_code == 200, first.text
    assert probe.encodes == before + 1
    second = upload(client, prompt, text="Hello again.", seed=2, format="mp3")
    assert second.status_code == 200 and second.headers["content-type"] == "audio/mpeg"
    assert probe.encodes == before + 1  # the same prompt bytes: features from the cache
    metrics = client.get("/metrics").text
    assert metric(metrics, "cosyvoice_prompt_cache_hits_total") >= 1
    # a different transcript is a different prompt (zero-shot features carry the text)
    upload(client, prompt, text="Hello.", prompt_text="Some words.", seed=2)
    assert probe.encodes == before + 2


def test_voice_conversion_takes_two_files_of_the_upload_limit_each(client):
    """Each file may have the upload limit: voice conversion's two together pass one file's
    (they were once refused as one body over it)."""
    source, prompt = prompt_wav(7.5, amplitude=0.5), prompt_wav(7.5)
    assert len(prompt) < 400_000 < len(source) + len(prompt) - 64 * 1024
    converted = upload(client, prompt, source=source)
    assert converted.status_code == 200, converted.text
    assert decode(converted.content)[0].size > 0


def test_a_source_is_held_to_the_servers_prompt_limit_as_it_is_decoded(client, probe):
    """A source whose header does not say its length is refused at the server's limit (8 s
    here) while it is decoded (once admitted), not at the engine's 30 s; one within it converts
    as the same source sent with its length does."""
    refused = upload(client, prompt_wav(2.0), source=streamed_flac(9.0))
    error = assert_error(refused, 400, "source audio", "too long: more than 8 s")
    assert error["param"] == "source_wav"
    converted = upload(client, prompt_wav(2.0), source=streamed_flac(3.0), seed=4)
    assert converted.status_code == 200, converted.text
    same = upload(client, prompt_wav(2.0), source=prompt_wav(3.0), seed=4)
    np.testing.assert_array_equal(decode(converted.content)[0], decode(same.content)[0])


def test_voice_conversion_with_prompt_or_voice(client):
    source = prompt_wav(1.2, rate=16000, amplitude=0.5)
    converted = upload(client, prompt_wav(2.0), source=source)
    assert converted.status_code == 200, converted.text
    assert decode(converted.content)[0].size > 0
    client.post(
        "/voices", data={"name": "target"}, files={"audio": ("t.wav", prompt_wav(1.8), "audio/wav")}
    )
    into_saved = upload(client, source=source, speaker="target")
    assert into_saved.status_code == 200, into_saved.text
    # a preset of the -SFT model has no prompt recording: a clear 400, not a 500
    assert_error(upload(client, source=source, speaker="中文女"), 400, "no prompt recording")
    assert_error(upload(client, source=source), 400, "voice conversion needs a target")
    assert_error(upload(client, source=source, speaker="nobody"), 404, "unknown voice")


def test_upload_errors(client):
    assert_error(upload(client, text=TEXT), 400, "missing prompt_wav")
    assert_error(upload(client, b"not audio", text=TEXT), 415, "could not be decoded")
    assert_error(upload(client, b"x" * 400_001, text=TEXT), 413, "too large")
    assert_error(upload(client, prompt_wav(9.0), text=TEXT), 400, "too long", "8 s")
    assert_error(upload(client, prompt_wav(0.2), text=TEXT), 400, "too short")
    error = assert_error(
        upload(client, prompt_wav(2.0), text=TEXT, instruct="开心"), 400, "CosyVoice2/3"
    )
    assert error["code"] == "unsupported_mode"
    assert error["supported_modes"] == ["preset", "zero_shot", "cross_lingual", "vc"]
    assert_error(upload(client, prompt_wav(2.0), text=TEXT, mode="zero_shot"), 400, "transcript")
    assert_error(upload(client, prompt_wav(2.0), text=TEXT, speed="fast"), 400, "speed")
    assert_error(upload(client, prompt_wav(2.0), text=TEXT, format="aac"), 400, "format")
    assert_error(upload(client, prompt_wav(2.0), text="字" * 4097), 400, "limit is 4096")
    assert_error(upload(client, prompt_wav(2.0), text=TEXT, colour="red"), 400, "unknown field")
    assert_error(client.post("/tts/upload", json={"text": TEXT}), 415, "multipart")


# ---------------------------------------------------------------------------------- OpenAI API


def test_ref_audio_with_the_openai_client(openai_client, client):
    prompt = prompt_wav(2.0)
    result = openai_client.audio.speech.create(
        model="tts-1",
        voice="unused-with-ref",
        input=TEXT,
        response_format="wav",
        extra_body={"ref_audio": data_uri(prompt), "ref_text": PROMPT_TEXT, "seed": 5},
    )
    audio, rate = decode(result.read())
    oneoff = upload(client, prompt, text=TEXT, prompt_text=PROMPT_TEXT, seed=5)
    np.testing.assert_array_equal(audio, decode(oneoff.content)[0])
    # bare base64 works too, and voice may be left out
    bare = client.post(
        "/v1/audio/speech",
        json={
            "model": "tts-1",
            "input": TEXT,
            "response_format": "wav",
            "seed": 5,
            "ref_audio": base64.b64encode(prompt).decode(),
            "ref_text": PROMPT_TEXT,
        },
    )
    assert bare.status_code == 200 and bare.content == result.content


def test_ref_audio_errors(client):
    def speech(**body):
        return client.post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, **body})

    assert_error(speech(ref_audio="https://example.com/a.wav"), 400, "URLs are not fetched")
    assert_error(speech(ref_audio="data:audio/wav,abc"), 400, "base64")
    assert_error(speech(ref_audio="%%%"), 400, "not valid base64")
    assert_error(speech(ref_audio=base64.b64encode(b"noise").decode()), 415, "could not be decoded")
    assert_error(speech(ref_audio="A" * 600_000), 413, "too large")
    assert_error(speech(), 400, "voice is required")
    assert_error(speech(voice="中文女", input="字" * 4097), 400, "4096")
    converted = speech(
        source_audio=data_uri(prompt_wav(1.0)), voice="target-oai", response_format="wav"
    )
    assert_error(converted, 404, "unknown voice")


def test_voice_conversion_over_the_openai_api(client):
    source = prompt_wav(1.2, amplitude=0.5)
    body = {
        "model": "tts-1",
        "input": "",
        "voice": "alloy",
        "response_format": "wav",
        "source_audio": data_uri(source),
        "ref_audio": data_uri(prompt_wav(2.0)),
    }
    converted = client.post("/v1/audio/speech", json=body)
    assert converted.status_code == 200, converted.text
    audio, rate = decode(converted.content)
    assert rate == 22050 and audio.size > 0
    same = upload(client, prompt_wav(2.0), source=source)  # the multipart route, same request
    assert abs(len(decode(same.content)[0]) - audio.size) <= 1


def test_openai_voices_and_aliases(openai_client, client, v1_dir):
    voices = {v["id"]: v for v in client.get("/v1/audio/voices").json()["data"]}
    assert voices["中文女"]["kind"] == "preset" and voices["英文男"]["kind"] == "preset"
    assert voices["alloy"] == {
        "id": "alloy",
        "name": "alloy",
        "object": "audio.voice",
        "kind": "alias",
        "target": "中文女",
    }
    assert (
        voices["echo"]["target"] == "英文男" and voices["nova"]["target"] == "日语男"
    )  # configured
    # alloy speaks as its preset, byte for byte
    alloy = openai_client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="wav", extra_body={"seed": 1}
    )
    preset = client.post("/tts", json={"text": TEXT, "speaker": "中文女", "seed": 1})
    np.testing.assert_array_equal(decode(alloy.read())[0], decode(preset.content)[0])

    # create (OpenAI custom voices: name + audio_sample + transcript), use, delete
    created = client.post(
        "/v1/audio/voices",
        data={"name": "oai-voice", "transcript": PROMPT_TEXT},
        files={"audio_sample": ("s.wav", prompt_wav(2.0), "audio/wav")},
    )
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "oai-voice" and created.json()["prompt_text"] == PROMPT_TEXT
    assert "oai-voice" in {v["id"] for v in client.get("/v1/audio/voices").json()["data"]}
    spoken = openai_client.audio.speech.create(
        model="cosyvoice-lite", voice="oai-voice", input=TEXT, response_format="flac"
    )
    assert decode(spoken.read())[0].size > 0
    again = client.post(
        "/v1/audio/voices",
        data={"name": "oai-voice"},
        files={"audio_sample": ("s.wav", prompt_wav(2.0), "audio/wav")},
    )
    assert_error(again, 409, "already exists")
    assert_error(
        client.post(
            "/v1/audio/voices",
            data={"name": "alloy"},
            files={"audio": ("s.wav", prompt_wav(2.0), "audio/wav")},
        ),
        409,
    )
    # an alias or preset is taken in any case or compatibility form, on either endpoint
    for taken in ("ｎｏｖａ", "ALLOY"):
        sample = {"audio": ("s.wav", prompt_wav(2.0), "audio/wav")}
        assert_error(client.post("/v1/audio/voices", data={"name": taken}, files=sample), 409)
    for taken in ("alloy", "Nova"):
        sample = {"audio": ("s.wav", prompt_wav(2.0), "audio/wav")}
        assert_error(client.post("/voices", data={"name": taken}, files=sample), 409, "alias")
    assert_error(
        client.post(
            "/v1/audio/voices", data={"name": "x"}, files={"audio": ("s.wav", b"junk", "audio/wav")}
        ),
        415,
    )
    assert client.delete("/v1/audio/voices/oai-voice").json()["deleted"] is True
    assert_error(client.delete("/v1/audio/voices/oai-voice"), 404)
    assert_error(client.delete("/v1/audio/voices/中文女"), 409, "preset")


def test_models_list_aliases(openai_client, probe):
    names = [m.id for m in openai_client.models.list().data]
    assert names[0] == probe.model.name
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "cosyvoice-lite"} <= set(names)


def test_long_input_streams_segment_by_segment(server, probe):
    """Without ``stream: true`` a long input (over the old 200-character limit) is chunked: one
    piece per segment of ~80 characters, the first on the wire before the last is made."""
    text = "".join(
        f"这是用来测试长文本的第{i}句话，它会被切分成若干段落，然后一段一段地合成并发送出去。"
        for i in range(1, 9)
    )
    assert len(text) > 300
    body = {"model": "tts-1", "voice": "中文女", "input": text, "response_format": "pcm", "seed": 4}
    with server.client() as own, own.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.status_code == 200
        start, arrivals = time.monotonic(), []
        for piece in response.iter_raw():
            arrivals.append((time.monotonic() - start, len(piece)))
    assert len(arrivals) >= 4, arrivals  # four segments
    assert arrivals[-1][0] - arrivals[0][0] > 0.1


def test_openapi_matches_the_server(client):
    spec = client.get("/openapi.json").json()
    speech = spec["paths"]["/v1/audio/speech"]["post"]
    schema = spec["components"]["schemas"]["SpeechRequest"]["properties"]
    assert schema["speed"]["minimum"] == 0.5 and schema["speed"]["maximum"] == 2.0
    assert schema["response_format"]["enum"] == ["mp3", "opus", "flac", "wav", "pcm"]
    assert {"ref_audio", "ref_text", "source_audio"} <= set(schema)
    assert {"400", "404", "413", "415", "429"} <= set(speech["responses"])
    # a schema 422 only where the server gives one: /tts's JSON body (the /v1 routes answer
    # 400, as OpenAI does; forms and paths are checked by their routes)
    with_422 = {
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if "422" in operation.get("responses", {})
    }
    assert with_422 == {"POST /tts"}, with_422
    assert "multipart/form-data" in spec["paths"]["/tts/upload"]["post"]["requestBody"]["content"]
    voices = spec["paths"]["/v1/audio/voices"]
    assert {"get", "post"} <= set(voices) and "delete" in spec["paths"]["/v1/audio/voices/{name}"]


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and '"static/docs/swagger-ui-bundle.js"' in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        got = client.get(f"/static/docs/{asset}")
        assert got.status_code == 200 and len(got.content) > 10_000, asset
    assert '"static/docs/redoc.standalone.js"' in client.get("/redoc").text
    assert client.get("/static/docs/../app.py").status_code == 404


# ---------------------------------------------------------------------------------- CosyVoice2/3


@pytest.fixture(scope="module")
def v3_server(tmp_path_factory):
    from cosyvoice_lite.engine import Engine

    engine = Engine.load(DATA / "models" / "v3-tiny")
    with ServerThread(create_app(engine, Settings(voices_dir=tmp_path_factory.mktemp("v3")))) as s:
        yield s


def test_instruct_with_a_one_off_prompt_and_no_presets(v3_server):
    with v3_server.client() as client:
        instructed = upload(client, prompt_wav(2.0), text=TEXT, instruct="用开心的语气说", seed=1)
        assert instructed.status_code == 200, instructed.text
        audio, rate = decode(instructed.content)
        assert rate == 24000 and audio.size > 0
        body = {
            "model": "tts-1",
            "input": TEXT,
            "response_format": "wav",
            "seed": 1,
            "ref_audio": data_uri(prompt_wav(2.0)),
            "instructions": "用开心的语气说",
        }
        same = client.post("/v1/audio/speech", json=body)
        np.testing.assert_array_equal(decode(same.content)[0], audio)
        # no presets on this model: an OpenAI name is a 404 naming what to do instead
        error = assert_error(
            client.post(
                "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy"}
            ),
            404,
            "OpenAI default name",
            "ref_audio",
            "--voice-alias",
        )
        assert error["code"] == "voice_not_found"
        assert not [
            v for v in client.get("/v1/audio/voices").json()["data"] if v["kind"] == "alias"
        ]


def test_prompt_cache_is_bounded_and_expires():
    import torch

    from cosyvoice_lite.frontend.prompt import PromptFeatures
    from cosyvoice_lite.serving.prompts import PromptCache

    def features(n: int) -> PromptFeatures:
        return PromptFeatures(
            torch.full((1, 4), n, dtype=torch.int32), torch.zeros(1, 8, 80), torch.zeros(1, 192)
        )

    cache = PromptCache(size=2, ttl=0.3)
    keys = [PromptCache.key(bytes([i]) * 10, "", "v1-22050") for i in range(3)]
    assert len(set(keys)) == 3 and PromptCache.key(b"a", "x", "v1") != PromptCache.key(
        b"a", "y", "v1"
    )
    for i, key in enumerate(keys):
        cache.put(key, features(i))
    assert cache.get(keys[0]) is None  # least recently used, evicted
    assert int(cache.get(keys[2]).speech_tokens[0, 0]) == 2
    time.sleep(0.4)
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is None  # expired
    assert PromptCache(size=0, ttl=10).get(keys[0]) is None


def test_openai_client_gets_whole_files_named_params_and_400s(openai_client, client):
    """What OpenAI's client relies on: wav/flac come whole with their lengths stated (a
    streamed flac header says 0 samples, which libsndfile could not read back), errors name the
    client's own field, a schema error is a 400 (BadRequestError), dated model names and
    GET /v1/models/{id} work, and voices.create's own fields are taken."""
    import io
    import wave

    import openai
    import soundfile as sf

    flac = openai_client.audio.speech.create(
        model="gpt-4o-mini-tts-2025-12-15", voice="中文女", input=TEXT, response_format="flac"
    ).content
    samples, rate = sf.read(io.BytesIO(flac))
    assert len(samples) > 0 and rate > 0
    wav = openai_client.audio.speech.create(
        model="tts-1", voice="中文女", input=TEXT, response_format="wav"
    ).content
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getnframes() * w.getsampwidth() == len(wav) - 44
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.speech.create(model="tts-1", voice="中文女", input=TEXT, speed=4.0)
    assert info.value.body["param"] == "speed"
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.speech.create(
            model="tts-1", voice="中文女", input=TEXT, instructions="Speak cheerfully."
        )
    assert info.value.body["param"] == "instructions"  # an SFT model takes none
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.speech.create(model="tts-1", voice="中文女", input=" ")
    assert info.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        openai_client.audio.speech.create(
            model="tts-1", voice="中文女", input=TEXT, extra_body={"speed": "fast"}
        )
    assert openai_client.models.retrieve("tts-1").id == "tts-1"
    for dated in ("tts-1-1106", "tts-1-hd-1106"):  # OpenAI's dated names of tts-1 and -hd
        assert openai_client.models.retrieve(dated).id == dated
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("whisper-1")
    with pytest.raises(openai.BadRequestError) as info:  # (a 404 echoed it whole)
        openai_client.audio.speech.create(model="m" * 300, voice="中文女", input=TEXT)
    assert info.value.body["code"] == "model_too_long"
    sample = ("s.wav", prompt_wav(2.0), "audio/wav")
    voice = openai_client.audio.voices.create(
        name="typed-voice", audio_sample=sample, consent="cons_1", type="audio_sample"
    )
    assert voice.id == "typed-voice"
    assert client.delete("/v1/audio/voices/typed-voice").status_code == 200
    error = assert_error(
        client.post(
            "/v1/audio/voices", data={"name": "p", "type": "prompt"}, files={"audio_sample": sample}
        ),
        400,
    )
    assert error["param"] == "type"


def test_errors_name_each_apis_own_field(client):
    """The engine's field names (voice, text, prompt_audio) reach each API as its own."""
    error = assert_error(client.post("/tts", json={"text": TEXT, "speaker": "nobody"}), 404)
    assert error["param"] == "speaker"
    ref = data_uri(prompt_wav(2.0))
    body = {"model": "tts-1", "voice": "alloy", "input": " ", "ref_audio": ref}
    assert assert_error(client.post("/v1/audio/speech", json=body), 400)["param"] == "input"
    short = {"audio_sample": ("s.wav", prompt_wav(0.2), "audio/wav")}
    error = assert_error(client.post("/v1/audio/voices", data={"name": "short"}, files=short), 400)
    assert error["param"] == "audio_sample"
    error = assert_error(
        client.post("/voices", data={"name": "short"}, files={"audio": short["audio_sample"]}), 400
    )
    assert error["param"] == "audio"
    # a schema error names the field, not pydantic's union member ("voice.str")
    speech = {"model": "tts-1", "voice": "alloy", "input": TEXT}
    assert (
        assert_error(client.post("/v1/audio/speech", json={**speech, "voice": 5}), 400)["param"]
        == "voice"
    )
    nothing = assert_error(client.post("/v1/audio/speech", json={**speech, "input": "..."}), 400)
    assert nothing["param"] == "input"
    # ref_text alone was dropped without a word: the client believed it had cloned a voice
    alone = assert_error(client.post("/v1/audio/speech", json={**speech, "ref_text": "hi"}), 400)
    assert alone["param"] == "ref_text"
    # JSON sent as a form (curl's -d) or as text: 415 saying what to send, not a schema error
    for kind in ("application/x-www-form-urlencoded", "text/plain"):
        sent = client.post(
            "/v1/audio/speech", content=json.dumps(speech), headers={"content-type": kind}
        )
        assert assert_error(sent, 415, "application/json")["code"] == "unsupported_media_type"
    # a path's own name: the voice in /v1/audio/voices/{name} is "name"
    unknown = assert_error(client.delete("/v1/audio/voices/nosuchvoice"), 404)
    assert unknown["param"] == "name"
    assert assert_error(client.get("/voices/nosuchvoice"), 404)["param"] == "name"
    # Kokoro-FastAPI's clients read "voices"; OpenAI's "data"
    listed = client.get("/v1/audio/voices").json()
    assert listed["voices"] == listed["data"] and {"id", "name"} <= set(listed["voices"][0])
