"""Results uploaded to S3-compatible storage, tested against a real local S3 server (moto in
server mode, started here on a loopback port)."""

from __future__ import annotations

import json

import pytest
from test_server_support import (
    ServerThread,
    decode,
    free_port,
    metric,
    moto_server,
    prompt_wav,
    tiny_engine,
    wait_for,
)

from cosyvoice_lite.serving import S3Settings, Settings, create_app

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="moto[server] is needed for the local S3 server")


@pytest.fixture(scope="module")
def s3_url():
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def s3(s3_url):
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
    client.create_bucket(Bucket="results")
    return client


def keys(s3, prefix: str, request_id: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket="results", Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listing if request_id in o["Key"])


def test_results_are_uploaded(v1_dir, s3, s3_url, tmp_path):
    engine = tiny_engine(v1_dir)
    voice = engine.voices()[0]
    settings = Settings(voices_dir=tmp_path, s3=S3Settings("results", "runs/", s3_url, "us-east-1"))
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        response = client.post("/tts", json={"text": "你好。", "speaker": voice, "seed": 1})
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        assert wait_for(lambda: len(keys(s3, "runs/", request_id)) == 2, timeout=20)
        found = keys(s3, "runs/", request_id)
        assert found[0].endswith(".json") and found[1].endswith(".wav")
        meta = json.loads(s3.get_object(Bucket="results", Key=found[0])["Body"].read())
        assert meta["id"] == request_id and meta["text"] == "你好。" and meta["voice"] == voice
        obj = s3.get_object(Bucket="results", Key=found[1])
        assert obj["ContentType"] == "audio/wav"
        assert obj["Body"].read() == response.content  # the same file the client got

        speech = client.post(
            "/v1/audio/speech",
            json={"model": "tts-1", "input": "你好。", "voice": voice, "response_format": "mp3"},
        )
        request_id = speech.headers["x-request-id"]
        assert wait_for(lambda: len(keys(s3, "runs/", request_id)) == 2, timeout=20)
        mp3 = [k for k in keys(s3, "runs/", request_id) if k.endswith(".mp3")]
        assert len(mp3) == 1
        audio, rate = decode(s3.get_object(Bucket="results", Key=mp3[0])["Body"].read())
        assert rate == 22050 and len(audio) > 0
        assert metric(client.get("/metrics").text, "cosyvoice_s3_uploads_total") == 2


def test_upload_failure_does_not_break_serving(v1_dir, s3_url, tmp_path):
    engine = tiny_engine(v1_dir)
    settings = Settings(
        voices_dir=tmp_path, s3=S3Settings("no-such-bucket", "", s3_url, "us-east-1")
    )
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        response = client.post("/tts", json={"text": "你好。", "speaker": engine.voices()[0]})
        assert response.status_code == 200
        assert wait_for(
            lambda: metric(client.get("/metrics").text, "cosyvoice_s3_upload_errors_total") == 1,
            timeout=20,
        )
        # still serving, but an operator's probe says results are not being kept
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["storage"]["outputs_error"].startswith("S3 uploads failing")
        assert ready.json()["storage"]["outputs_error"].endswith(": NoSuchBucket")


def test_public_ready_names_no_endpoint_bucket_key_nor_request(v1_dir, tmp_path, caplog):
    """The public /ready (no key needed: load balancers probe it) showed the raw error of a
    failing upload: the internal S3 endpoint, the bucket, the key prefix and another client's
    request id. Now only the error's code or class; the whole error goes to the log."""
    engine = tiny_engine(v1_dir)
    gone = f"127.0.0.1:{free_port()}"  # S3 stopped: nothing listens there
    s3 = S3Settings("internal-results", "tenant-a/", f"http://{gone}", "us-east-1", max_attempts=1)
    settings = Settings(voices_dir=tmp_path, s3=s3, api_key="secretKEY123")
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        response = client.post(
            "/tts",
            json={"text": "你好。", "speaker": engine.voices()[0], "seed": 1},
            headers={"Authorization": "Bearer secretKEY123", "X-Request-Id": "customer-4712"},
        )
        assert response.status_code == 200
        assert wait_for(lambda: "outputs_error" in client.get("/ready").text, timeout=30)
        ready = client.get("/ready")  # without the key
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    storage = ready.json()["storage"]
    assert storage["outputs"] == "degraded"
    assert storage["outputs_error"].startswith("S3 uploads failing")
    assert storage["outputs_error"].endswith(": EndpointConnectionError")
    for secret in (gone, "internal-results", "tenant-a", "customer-4712", "secretKEY123"):
        assert secret not in ready.text, secret
    assert gone in caplog.text and "customer-4712" in caplog.text  # the operator's log has it


def no_features(audio: bytes, text: str):
    import torch

    from cosyvoice_lite.frontend.prompt import PromptFeatures

    return PromptFeatures(
        torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 8, 80), torch.zeros(1, 192), text
    )


def test_listing_a_voice_bucket_reads_only_the_voices_changed(s3, s3_url, monkeypatch):
    """Listing the saved voices (GET /voices, /speakers, the page) read every voice's manifest
    from the bucket (a GET, and a HEAD per voice), and listings at once each did so, holding
    the storage waiters (synthesis with saved voices got 503). Now a listing is one LIST, plus a
    GET for each voice changed since, and listings at once share one."""
    import threading
    import time

    from cosyvoice_lite.serving import voice_store_s3
    from cosyvoice_lite.serving.voice_store_s3 import S3VoiceStore
    from cosyvoice_lite.serving.voices import VoiceLibrary

    monkeypatch.setattr(voice_store_s3, "CACHE_TTL", 0.3)  # how long a listing is reused
    s3.create_bucket(Bucket="voices")
    settings = S3Settings("voices", "list/", s3_url, "us-east-1")
    library = VoiceLibrary(S3VoiceStore(settings), max_voices=100)
    library.create("seed", prompt_wav(1.0), "hi", "k", no_features)
    manifest = s3.get_object(Bucket="voices", Key="list/voices/seed.json")
    body, generation = json.loads(manifest["Body"].read()), manifest["Metadata"]["generation"]
    wav = s3.get_object(Bucket="voices", Key=f"list/voice-data/seed/{generation}/prompt.wav")
    wav = wav["Body"].read()
    for i in range(20):  # saved by other processes
        name = f"seed{i:02d}"
        s3.put_object(Bucket="voices", Key=f"list/voice-data/{name}/g/prompt.wav", Body=wav)
        s3.put_object(
            Bucket="voices",
            Key=f"list/voices/{name}.json",
            Body=json.dumps({**body, "name": name}).encode(),
            Metadata={"generation": "g"},
        )
    sent, waiting = [], []

    def count(request, **_):  # every request the library's store sends
        sent.append(request.url)
        if "list-type=2" in request.url:
            waiting.append(library.storage_waiting)
            time.sleep(0.3)  # a slow LIST: listings meanwhile wait for this one

    library.store.client.meta.events.register("before-send.s3", count)

    def listed() -> list[str]:
        time.sleep(0.35)  # the listing read before is too old to reuse
        sent.clear()
        return [voice.name for voice in library.list()]

    assert len(listed()) == 21 and len(sent) > 21  # each voice read once
    assert len(listed()) == 21 and len(sent) == 1 and "list-type=2" in sent[0]
    other = VoiceLibrary(S3VoiceStore(settings))  # another process writes a voice again
    other.delete("seed03")
    other.create("seed03", prompt_wav(1.0), "again", "k", no_features)
    assert len(listed()) == 21 and len(sent) == 3  # LIST, its manifest (GET), its prompt (HEAD)
    assert {v.name: v.prompt_text for v in library.list()}["seed03"] == "again"
    time.sleep(0.35)
    sent.clear()
    waiting.clear()
    results = []
    listers = [threading.Thread(target=lambda: results.append(library.list())) for _ in range(16)]
    for lister in listers:
        lister.start()
    for lister in listers:
        lister.join(30)
    assert len(sent) == 1 and waiting == [1]  # one LIST for all, one storage waiter
    assert [len(result) for result in results] == [21] * 16
