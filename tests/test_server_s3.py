"""Results uploaded to S3-compatible storage, tested against a real local S3 server (moto in
server mode, started here on a loopback port)."""

from __future__ import annotations

import json

import pytest
from test_server_support import ServerThread, decode, metric, moto_server, tiny_engine, wait_for

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
