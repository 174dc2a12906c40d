"""Issue 11, results kept safely: unique names whatever the request id; with S3, saved locally
first, uploads with timeouts and bounded tries counted done/failed/pending, a graceful stop that
does not wait for a hung S3, and pending uploads finished at the next start (real moto S3, and
a real TCP endpoint that accepts and never answers)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
from test_server_s3 import keys, s3, s3_url  # noqa: F401 - the local S3 server fixtures
from test_server_support import ServerThread, decode, metric, tiny_engine, wait_for

from cosyvoice_lite.serving import S3Settings, Settings, create_app


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


@pytest.fixture
def silent_s3():
    """A TCP endpoint that accepts connections and never answers (a hung S3)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for sock in held:
        sock.close()
    listener.close()


def test_output_names_are_unique_for_a_repeated_request_id(engine, tmp_path):
    settings = Settings(voices_dir=tmp_path / "voices", outputs_dir=tmp_path / "out")
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        body = {"text": "你好。", "speaker": engine.voices()[0], "seed": 1}
        for _ in range(3):  # same client-chosen id, same second
            response = client.post("/tts", json=body, headers={"X-Request-Id": "same"})
            assert response.status_code == 200
        metas = wait_for(lambda: len(list((tmp_path / "out").glob("*/*same.json"))) == 3)
        assert metas
        assert len(list((tmp_path / "out").glob("*/*same.wav"))) == 3
        # an Opus result (resampled to 48 kHz from the model's 22.05) says the rate it has
        response = client.post(
            "/tts", json={**body, "format": "opus"}, headers={"X-Request-Id": "op"}
        )
        assert response.status_code == 200
        assert wait_for(lambda: list((tmp_path / "out").glob("*/*op.json")))
        meta = json.loads(next((tmp_path / "out").glob("*/*op.json")).read_text())
        _, rate = decode(next((tmp_path / "out").glob(f"*/{meta['audio_file']}")).read_bytes())
        assert meta["sample_rate"] == rate == 48000


def test_results_are_saved_at_once_while_uploads_hang(engine, tmp_path, silent_s3, monkeypatch):
    """Saving and uploading were one thread: behind an upload to a hung S3 finished results
    waited in memory, unsaved, and a stop lost them."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # so that the upload is tried
        monkeypatch.setenv(name, "test")
    hung = S3Settings("results", "", silent_s3, "us-east-1", connect_timeout=0.5,
                      read_timeout=30, max_attempts=1)  # fmt: skip
    spool = tmp_path / "spool"
    settings = Settings(voices_dir=tmp_path / "voices", s3=hung, spool_dir=spool,
                        shutdown_timeout=1.0)  # fmt: skip
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        for seed in range(3):
            body = {"text": "你好。", "speaker": engine.voices()[0], "seed": seed}
            assert client.post("/tts", json=body).status_code == 200
        assert wait_for(lambda: len(list(spool.rglob(".*.s3-pending"))) == 3, timeout=20)
    # stopped with every upload pending: all three are on disk for the next start
    assert len(list(spool.rglob("*.wav"))) == 3 and len(list(spool.rglob("*.json"))) == 3


def test_hung_s3_is_counted_failed_kept_locally_and_does_not_hold_shutdown(
    engine,
    tmp_path,
    silent_s3,
    s3,  # noqa: F811 - the fixtures imported above
    s3_url,  # noqa: F811
):
    spool = tmp_path / "spool"
    hung = S3Settings(
        "results",
        "hung/",
        silent_s3,
        "us-east-1",
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=2,
    )
    settings = Settings(voices_dir=tmp_path / "voices", s3=hung, spool_dir=spool)
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        response = client.post("/tts", json={"text": "你好。", "speaker": engine.voices()[0]})
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]

        def counted() -> bool:
            text = client.get("/metrics").text
            return (
                metric(text, "cosyvoice_s3_upload_errors_total") == 1
                and metric(text, "cosyvoice_s3_uploads_pending") == 0
            )

        assert wait_for(counted, timeout=30)
    # nothing lost: audio, metadata and the pending marker are on disk
    assert len(list(spool.glob(f"*/*{request_id}.wav"))) == 1
    assert len(list(spool.glob(f"*/.*{request_id}.s3-pending"))) == 1

    # a stop while an upload hangs (30 s read timeout, 3 tries) waits shutdown_timeout, not 90 s
    slow = S3Settings("results", "hung/", silent_s3, "us-east-1", read_timeout=30)
    settings = Settings(
        voices_dir=tmp_path / "voices", s3=slow, spool_dir=spool, shutdown_timeout=1.0
    )
    server = ServerThread(create_app(engine, settings)).__enter__()  # retries the pending one
    with server.client() as client:
        assert wait_for(
            lambda: metric(client.get("/metrics").text, "cosyvoice_s3_uploads_pending") == 1,
            timeout=10,
        )
    start = time.monotonic()
    server.__exit__(None, None, None)
    assert not server.thread.is_alive() and time.monotonic() - start < 6

    # S3 is back: the next start uploads what was pending and clears the spool
    settings = Settings(
        voices_dir=tmp_path / "voices",
        spool_dir=spool,
        s3=S3Settings("results", "back/", s3_url, "us-east-1"),
    )
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        assert wait_for(lambda: len(keys(s3, "back/", request_id)) == 2, timeout=30)
        assert wait_for(
            lambda: metric(client.get("/metrics").text, "cosyvoice_s3_uploads_total") == 1,
            timeout=10,
        )
    assert not list(spool.glob(f"*/*{request_id}*")) and not list(spool.glob("*/.*"))


def test_results_past_keep_days_are_removed_a_day_at_a_time(tmp_path):
    """--outputs-dir kept every result for good (a soak run filled 3,000 files in 20 minutes);
    with --outputs-keep-days a day's folder goes once its last result is that old, unless an
    upload from it is still pending, and nothing else in the directory is touched."""
    from datetime import datetime, timedelta, timezone

    import numpy as np

    from cosyvoice_lite.serving.metrics import Metrics
    from cosyvoice_lite.serving.outputs import OutputStore

    out = tmp_path / "out"
    yesterday = f"{datetime.now(timezone.utc) - timedelta(days=1):%Y-%m-%d}"
    for day, files in (
        ("2020-01-01", ["a.wav", "a.json"]),
        ("2020-01-02", ["b.wav", "b.json", ".b.s3-pending"]),
        (yesterday, ["c.wav", "c.json"]),
        ("notes", ["keep.txt"]),
        ("2020-1-1", ["keep.txt"]),  # (a date, but not a folder the server writes)
    ):
        (out / day).mkdir(parents=True)
        for name in files:
            (out / day / name).write_bytes(b"x")
    metrics = Metrics()
    store = OutputStore(out, None, metrics, keep_days=3)
    try:
        assert wait_for(lambda: not (out / "2020-01-01").exists())
        store.submit("new", np.full(2205, 0.1, np.float32), 22050, "wav", {})
        assert store.flush(timeout=10)
        left = sorted(path.name for path in out.iterdir())
        assert left == sorted(
            ["2020-01-02", yesterday, "notes", "2020-1-1", f"{datetime.now(timezone.utc):%Y-%m-%d}"]
        )
        assert metric(metrics.render(), "cosyvoice_outputs_removed_total") == 2
    finally:
        store.shutdown()
    # a pass that fails (the directory removed by hand) had ended the save thread for good:
    # every later result was lost
    store = OutputStore(out, None, metrics, keep_days=3, prune_every=0.05)
    try:
        shutil.rmtree(out)
        time.sleep(0.2)
        store.submit("later", np.full(2205, 0.1, np.float32), 22050, "wav", {})
        assert store.flush(timeout=10)
        assert list(out.glob("*/*later.json"))
    finally:
        store.shutdown()
    with pytest.raises(ValueError, match="outputs_keep_days applies to an outputs_dir"):
        Settings(voices_dir=tmp_path / "voices", outputs_keep_days=3)
