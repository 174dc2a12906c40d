"""Issue 11, results kept safely: unique names whatever the request id; with S3, saved locally
first, uploads with timeouts and bounded tries counted done/failed/pending, a graceful stop that
does not wait for a hung S3, and pending uploads finished while running and at the next start;
a result that cannot be saved locally uploaded from memory (within a budget); a save cut short
or failing midway leaves nothing behind for good; a spooled copy removed only once uploaded (a
read error tried again later, a damaged marker's files left alone) (real moto S3, and a real TCP
endpoint that accepts and never answers)."""

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

        def counted() -> bool:  # failed, and still pending (it read 0: nothing seemed to wait)
            text = client.get("/metrics").text
            return (
                metric(text, "cosyvoice_s3_upload_errors_total") >= 1
                and metric(text, "cosyvoice_s3_uploads_pending") == 1
                and metric(text, "cosyvoice_outputs_ok") == 0
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


def tone():
    import numpy as np

    return np.full(2205, 0.1, np.float32)


def results_store(spool, bucket: str, prefix: str, s3_url, **options):  # noqa: F811
    from cosyvoice_lite.serving.metrics import Metrics
    from cosyvoice_lite.serving.outputs import OutputStore

    settings = S3Settings(bucket, prefix, s3_url, "us-east-1", max_attempts=1)
    return OutputStore(None, settings, Metrics(), spool, **options)


def files_in(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def test_a_result_that_cannot_be_saved_locally_is_uploaded_from_memory(
    tmp_path,
    s3,  # noqa: F811
    s3_url,  # noqa: F811
):
    """With the spool full, every later result was lost, S3 healthy or not ("could not save
    result ... nothing kept"); now it is uploaded from memory, and lost (counted) only if
    that upload fails too."""
    from datetime import datetime, timedelta, timezone

    spool = tmp_path / "spool"
    spool.mkdir()
    for days in (0, 1):  # a file where the day's folder goes: no local save can be written
        (spool / f"{datetime.now(timezone.utc) + timedelta(days=days):%Y-%m-%d}").touch()
    store = results_store(spool, "results", "mem/", s3_url)
    try:
        store.submit("frommemory", tone(), 22050, "wav", {"text": "hi"})
        assert store.flush(timeout=30)
        assert len(keys(s3, "mem/", "frommemory")) == 2
        text = store.metrics.render()
        assert metric(text, "cosyvoice_outputs_save_errors_total") == 1
        assert metric(text, "cosyvoice_outputs_lost_total") == 0
        assert metric(text, "cosyvoice_s3_uploads_pending") == 0
        assert store.health() == "results could not be saved locally: File exists"  # no path
        assert metric(text, "cosyvoice_outputs_ok") == 0
    finally:
        store.shutdown()
    store = results_store(spool, "no-such-bucket", "", s3_url)  # S3 failing too: lost, said so
    try:
        store.submit("nowhere", tone(), 22050, "wav", {})
        assert store.flush(timeout=30)
        text = store.metrics.render()
        assert metric(text, "cosyvoice_outputs_lost_total") == 1
        assert metric(text, "cosyvoice_s3_uploads_pending") == 0
        assert "S3 uploads failing" in store.health()
    finally:
        store.shutdown()
    assert files_in(spool) == sorted(p.name for p in spool.iterdir())  # (only the two blockers)


def test_a_failed_local_save_is_shown_without_its_error_s_text(tmp_path, monkeypatch):
    """health() (the public /ready) gave a local save's error in its own words where it had no
    errno, which may name the path; now its strerror, else its class."""
    from cosyvoice_lite.serving import outputs
    from cosyvoice_lite.serving.metrics import Metrics

    def fail(path, data) -> None:
        raise OSError(f"cannot write {path}")

    monkeypatch.setattr(outputs, "write_atomic", fail)
    store = outputs.OutputStore(tmp_path / "results", None, Metrics())
    try:
        store.submit("customer-4712", tone(), 22050, "wav", {})
        assert store.flush(timeout=30)
        assert store.health() == "results could not be saved locally: OSError"
    finally:
        store.shutdown()


def test_failed_uploads_stay_pending_and_go_up_once_s3_is_back(
    tmp_path,
    s3,  # noqa: F811
    s3_url,  # noqa: F811
):
    """A failed upload was tried again only at the next start, and the pending gauge read 0
    meanwhile; now it stays pending (counted, the store unhealthy) and is tried again, after
    a pause that grows, while the server runs."""
    import uuid

    bucket, spool = f"later-{uuid.uuid4().hex[:8]}", tmp_path / "spool"
    store = results_store(spool, bucket, "", s3_url, retry_first=0.1, retry_most=0.4)
    try:
        for i in range(3):
            store.submit(f"wait{i}", tone(), 22050, "wav", {})
        assert store.flush(timeout=30)
        # tried again while running (the bucket is missing: an outage): more tries than results
        assert wait_for(
            lambda: metric(store.metrics.render(), "cosyvoice_s3_upload_errors_total") >= 5
        )
        text = store.metrics.render()
        assert metric(text, "cosyvoice_s3_uploads_pending") == 3
        assert metric(text, "cosyvoice_outputs_ok") == 0
        assert "S3 uploads failing" in store.health() and "3 result(s) waiting" in store.health()
        assert len(list(spool.rglob(".*.s3-pending"))) == 3

        s3.create_bucket(Bucket=bucket)  # S3 is back
        assert wait_for(lambda: store.pending == 0, timeout=10)
        listing = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        assert len(listing) == 6
        text = store.metrics.render()
        assert metric(text, "cosyvoice_s3_uploads_total") == 3
        assert metric(text, "cosyvoice_outputs_ok") == 1 and store.health() is None
        assert files_in(spool) == []  # spooled copies and markers removed once up
    finally:
        store.shutdown()


def fail_at_rename(monkeypatch, folder, n: int, first=None) -> None:  # noqa: ANN001
    """The ``n``-th file renamed into place under ``folder`` fails (after ``first()``)."""
    import errno
    import os

    real, seen = os.replace, []
    inside = str(folder.resolve())

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN202
        if str(dst).startswith(inside):
            seen.append(dst)
            if len(seen) == n:
                if first is not None:
                    first()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_save_cut_short_is_uploaded_or_cleared_at_the_next_start(
    tmp_path,
    s3,  # noqa: F811
    s3_url,  # noqa: F811
    monkeypatch,
    n,
):
    """Killed at a rename of a result's save (the spool copied as it is then): the metadata
    complete but the marker not written left a result never uploaded nor removed; a temporary
    ``.partial`` file stayed for good. Now the marker goes first, the next start removes the
    temporary files, and drops a marker whose files never came."""
    import os

    spool, crashed = tmp_path / "spool", tmp_path / "crashed"

    def crash() -> None:
        shutil.copytree(spool, crashed)
        old = time.time() - 120  # restarted two minutes later
        for path in crashed.rglob("*"):
            os.utime(path, (old, old))

    fail_at_rename(monkeypatch, spool, n, crash)
    store = results_store(spool, "results", f"first{n}/", s3_url)
    store.submit("cut", tone(), 22050, "wav", {})
    assert store.flush(timeout=30)
    store.shutdown()
    monkeypatch.undo()
    left = files_in(crashed)
    assert any(name.endswith(".partial") for name in left), left
    complete = any(name.endswith("cut.json") for name in left)  # the save had finished

    store = results_store(crashed, "results", f"crash{n}/", s3_url)
    try:
        assert store.flush(timeout=30)
        assert wait_for(lambda: store.pending == 0)
    finally:
        store.shutdown()
    assert files_in(crashed) == []  # uploaded or dropped: nothing kept for good, no .partial
    assert len(keys(s3, f"crash{n}/", "cut")) == (2 if complete else 0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_save_that_fails_midway_leaves_nothing_and_is_uploaded(
    tmp_path,
    s3,  # noqa: F811
    s3_url,  # noqa: F811
    monkeypatch,
    n,
):
    """The marker's write failing (ENOSPC) said "nothing kept: the result is lost" but left
    its audio and metadata in the spool for good; now what a failed save wrote is removed and
    the result uploaded from memory."""
    spool = tmp_path / "spool"
    fail_at_rename(monkeypatch, spool, n)
    store = results_store(spool, "results", f"midway{n}/", s3_url)
    try:
        store.submit("midway", tone(), 22050, "wav", {})
        assert store.flush(timeout=30)
    finally:
        store.shutdown()
    assert files_in(spool) == []
    assert len(keys(s3, f"midway{n}/", "midway")) == 2
    assert metric(store.metrics.render(), "cosyvoice_outputs_lost_total") == 0


@pytest.mark.parametrize("which", [".s3-pending", ".wav", ".json"])
def test_a_pending_result_unreadable_for_a_moment_is_uploaded_later(
    tmp_path,
    s3,  # noqa: F811
    s3_url,  # noqa: F811
    monkeypatch,
    which,
):
    """A read error at an upload (EMFILE: out of descriptors under a flood of connections; EIO)
    counted as a damaged result: the pending upload dropped and its spooled copy, the only one,
    deleted, or, the marker unreadable, the marker deleted and the copy left for good, never
    uploaded. Now it is tried again after a pause of its own, S3 not blamed for it."""
    import errno
    import io
    import os

    spool, real_open, failures = tmp_path / "spool", io.open, [3]

    def flaky_open(file, *args, **kwargs):  # noqa: ANN001, ANN202 - pathlib reads through it
        if str(file).startswith(str(spool)) and str(file).endswith(which) and failures[0]:
            failures[0] -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", flaky_open)
    store = results_store(spool, "results", f"flaky{which}/", s3_url, retry_first=0.2,
                          retry_most=0.4)  # fmt: skip
    try:
        store.submit("flaky", tone(), 22050, "wav", {})
        assert wait_for(lambda: failures[0] < 3)
        assert store.pending == 1 and store.health() is None  # waiting, S3 not failing
        assert wait_for(lambda: store.pending == 0, timeout=15)
        assert failures == [0] and len(keys(s3, f"flaky{which}/", "flaky")) == 2
        text = store.metrics.render()
        assert metric(text, "cosyvoice_outputs_lost_total") == 0
        assert metric(text, "cosyvoice_s3_upload_errors_total") == 0
        assert files_in(spool) == []  # removed once uploaded
    finally:
        store.shutdown()


def test_a_damaged_marker_is_dropped_and_leaves_the_files_alone(
    tmp_path,
    s3,  # noqa: F811
    s3_url,  # noqa: F811
):
    """A marker that cannot be taken as an upload (not JSON, a field missing, a name that is
    not a plain file name) is dropped, counted lost; the files beside it, possibly its result's
    only copy, were deleted with it, and are now left for a look."""
    folder = tmp_path / "spool" / "2020-01-01"
    folder.mkdir(parents=True)
    task = {"key": "2020-01-01/x", "audio": "a.wav", "meta": "a.json"}
    task.update(content_type="audio/wav", spooled=True)
    markers = {
        "a": {**task, "meta": "../a.json"},  # (refused as a name: not within the folder)
        "b": {key: value for key, value in task.items() if key != "meta"},
        "c": "not json",
    }
    for name, content in markers.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / f".{name}.s3-pending").write_text(text)
        (folder / f"{name}.wav").write_bytes(b"RIFF")
        (folder / f"{name}.json").write_text("{}")
    store = results_store(tmp_path / "spool", "results", "damaged/", s3_url)
    try:
        assert wait_for(lambda: store.pending == 0)
        assert metric(store.metrics.render(), "cosyvoice_outputs_lost_total") == 3
    finally:
        store.shutdown()
    assert files_in(folder) == [f"{name}.{ext}" for name in "abc" for ext in ("json", "wav")]
    assert not keys(s3, "damaged/", "")


def test_results_held_in_memory_for_upload_are_bounded(tmp_path, silent_s3, monkeypatch):
    """With the spool's disk full, every result waited in memory for its upload, one at a time
    to a slow S3 (10 MB/s on a busy server, without bound). Now results are held within a
    budget (bytes), and none while S3 is known to be failing: beyond, lost at once (counted)."""
    from datetime import datetime, timedelta, timezone

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # so that the upload is tried
        monkeypatch.setenv(name, "test")
    spool = tmp_path / "spool"
    spool.mkdir()
    for days in (0, 1):  # a file where the day's folder goes: no local save can be written
        (spool / f"{datetime.now(timezone.utc) + timedelta(days=days):%Y-%m-%d}").touch()
    hung = S3Settings("results", "", silent_s3, "us-east-1", connect_timeout=1, read_timeout=1.5,
                      max_attempts=1)  # fmt: skip
    from cosyvoice_lite.serving.metrics import Metrics
    from cosyvoice_lite.serving.outputs import OutputStore

    # a result is 4.5 kB (4,454 bytes of audio, its metadata): two fit
    store = OutputStore(None, hung, Metrics(), spool, memory_budget=12_000)
    try:
        for i in range(5):
            store.submit(f"held{i}", tone(), 22050, "wav", {})
        assert wait_for(lambda: store.unsaved == 0)
        assert store.lost == 3 and store.pending == 2  # the first's upload hangs meanwhile
        assert store.flush(timeout=30)
        # the first's upload failed: the second, not tried (S3 failing), is lost at once
        text = store.metrics.render()
        assert metric(text, "cosyvoice_outputs_lost_total") == 5
        assert metric(text, "cosyvoice_s3_upload_errors_total") == 1
        assert metric(text, "cosyvoice_s3_uploads_pending") == 0
        store.submit("later", tone(), 22050, "wav", {})  # S3 still failing: not held
        assert store.flush(timeout=5) and store.lost == 6 and store.pending == 0
    finally:
        store.shutdown()
