"""Issue 12, the voice library in a shared S3 bucket: two server processes' worth of apps on one
real local S3 server (moto in server mode), a voice made through one usable through the other at
once, deletion seen by both, an unreachable bucket at start named with its endpoint, S3
failing in the middle of a voice write (a real TCP relay in front of moto that cuts the
connection): 503 and no half voice, and a bucket that hangs (the relay holding every request)
holding up only the requests that need it, and a manifest PUT stored by the bucket but
answered with an error (an HTTP proxy that answers 500 after forwarding): the voice is saved."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_server_support import (
    ServerThread,
    decode,
    free_port,
    moto_server,
    prompt_wav,
    tiny_engine,
    wait_for,
)

from cosyvoice_lite.serving import S3Settings, Settings, create_app
from cosyvoice_lite.serving.voice_store_s3 import CACHE_TTL, S3VoiceStore
from cosyvoice_lite.serving.voices import HEALTH_HUNG, HEALTH_WAIT, StorageError

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="moto[server] is needed for the local S3 server")

BUCKET = "voices"


class Relay:
    """A TCP relay to ``target`` that lets ``puts`` PUT requests through and then cuts every
    connection that starts another one (S3 going away in the middle of a write)."""

    def __init__(self, target_port: int, puts: int) -> None:
        self.target_port, self.puts = target_port, puts
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        self.flowing = threading.Event()  # cleared: requests are held (a bucket that hangs)
        self.flowing.set()
        self.held = b""  # only requests that start so are held (b"DELETE "); b"": every one
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, sink, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and data.startswith(self.held):
                    self.flowing.wait()
                if from_client and data.startswith(b"PUT "):
                    with self.lock:
                        self.puts -= 1
                        cut = self.puts < 0
                    if cut:
                        break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.server.close()


INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
)


class FaultProxy:
    """An HTTP proxy to the S3 server at ``target`` that fails the requests ``rule(method,
    path)`` names: "lost" forwards the request (the bucket applies it) and answers 500 all the
    same (its answer lost, a gateway failing after forwarding); "500" answers 500 without
    forwarding it; "ok" passes it on. ``seen`` holds (method, path, what was done)."""

    def __init__(self, target: str) -> None:
        self.rule: Callable[[str, str], str] = lambda method, path: "ok"
        self.seen: list[tuple[str, str, str]] = []
        host, port = target.rsplit("//", 1)[1].split(":")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered here

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                action = proxy.rule(self.command, self.path)
                proxy.seen.append((self.command, self.path.split("?")[0], action))
                status, headers, data = 500, [("content-type", "application/xml")], INTERNAL_ERROR
                if action != "500":
                    upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                    upstream.request(
                        self.command,
                        self.path,
                        body=body,
                        headers={
                            k: v
                            for k, v in self.headers.items()
                            if k.lower() not in ("host", "expect", "connection")
                        },
                    )
                    answer = upstream.getresponse()
                    if action == "ok":
                        status, headers, data = answer.status, answer.getheaders(), answer.read()
                    upstream.close()
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                if self.command == "HEAD":  # the object's length, without its body
                    self.send_header("content-length", dict(headers).get("content-length", "0"))
                    self.end_headers()
                else:
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def s3_url():
    with moto_server() as url:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


def s3_settings(url: str, prefix: str, attempts: int = 3) -> S3Settings:
    return S3Settings(
        BUCKET, prefix, url, "us-east-1", connect_timeout=2, read_timeout=5, max_attempts=attempts
    )


def upload(client, name: str):
    return client.post(
        "/voices",
        data={"name": name, "prompt_text": "希望你以后能够做的比我还好呦。"},
        files={"audio": ("p.wav", prompt_wav(1.0), "audio/wav")},
    )


def keys(url: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    return sorted(
        o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    )


def test_a_voice_made_through_one_server_is_used_through_another(engine, s3_url, tmp_path):
    settings = Settings(voices_dir=tmp_path / "unused", voices_s3=s3_settings(s3_url, "shared/"))
    with (
        ServerThread(create_app(engine, settings)) as a,
        ServerThread(create_app(engine, settings)) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        assert upload(ca, "Nora").status_code == 201
        # the other server sees it at once (read-through), in any case, and speaks with it
        assert cb.get("/voices/nora").json()["name"] == "Nora"
        assert upload(cb, "NORA").status_code == 409
        spoken = cb.post("/tts", json={"text": "你好。", "speaker": "Nora", "seed": 1})
        assert spoken.status_code == 200, spoken.text
        samples, rate = decode(spoken.content)
        assert rate == engine.sample_rate and len(samples) > 0
        assert cb.get("/voices/Nora/audio").content == ca.get("/voices/Nora/audio").content
        assert [v["name"] for v in cb.get("/voices").json()["data"]] == ["Nora"]
        stored = keys(s3_url, "shared/")
        assert "shared/voices/Nora.json" in stored
        assert len([k for k in stored if k.startswith("shared/voice-data/Nora/")]) == 2
        # deleted through one: gone for the other within the cache time, data freed; the
        # other, still believing in it, deleting it too is told it is not there
        assert ca.get("/voices/Nora").status_code == 200
        assert cb.delete("/voices/Nora").status_code == 200
        assert ca.delete("/voices/Nora").json()["error"]["code"] == "voice_not_found"
        assert wait_for(lambda: ca.get("/voices/Nora").status_code == 404, CACHE_TTL + 3)
        assert ca.post("/tts", json={"text": "你好。", "speaker": "Nora"}).status_code == 404
        assert keys(s3_url, "shared/") == []
        # the name is free again, with new data (a new generation)
        assert upload(ca, "nora").status_code == 201
        assert cb.post("/tts", json={"text": "你好。", "speaker": "nora"}).status_code == 200


def test_an_unreachable_bucket_at_start_names_bucket_and_endpoint(engine, s3_url, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    for url, bucket in ((dead, BUCKET), (s3_url, "no-such-bucket")):
        settings = Settings(
            voices_dir=tmp_path,
            voices_s3=S3Settings(
                bucket, "", url, "us-east-1", connect_timeout=1, read_timeout=2, max_attempts=1
            ),
        )
        with pytest.raises(StorageError) as error:
            create_app(engine, settings)
        assert repr(bucket) in str(error.value) and url in str(error.value)


def test_a_voice_recording_is_sent_from_the_bucket_as_it_is_read(engine, s3_url, tmp_path):
    """GET /voices/{name}/audio read the whole object into memory for each request; now its
    body is read and sent a chunk at a time (its length from the object), holding no storage
    waiter meanwhile, and errors still come before anything is sent."""
    import hashlib

    from test_server_voices import download, long_recording

    from cosyvoice_lite.serving.voices import VoiceLibrary

    bucket = s3_settings(s3_url, "stream/")
    stored = long_recording(VoiceLibrary(S3VoiceStore(bucket)), "Long", rate=96000)
    settings = Settings(voices_dir=tmp_path, voices_s3=bucket, prepare_voices=0)
    with ServerThread(create_app(engine, settings)) as server, server.client() as client:
        status, headers, digest, peak = download(client, "/voices/long/audio")
        with client.stream("GET", "/voices/Long/audio") as response:
            chunks = response.iter_raw(64 * 1024)
            first = next(chunks)
            assert server.app.state.server.library.storage_waiting == 0
            rest = b"".join(chunks)
        assert client.get("/voices/nobody/audio").json()["error"]["code"] == "voice_not_found"
    assert status == 200 and digest == hashlib.sha256(stored).hexdigest()
    assert first + rest == stored
    assert headers["content-length"] == str(len(stored)) and headers["content-type"] == "audio/wav"
    assert headers["content-disposition"] == 'attachment; filename="long.wav"'
    assert peak < len(stored) / 4, (peak, len(stored))  # 11 MB sent, never held at once


def test_s3_failing_during_a_voice_write_is_503_and_leaves_no_half_voice(engine, s3_url, tmp_path):
    relay = Relay(int(s3_url.rsplit(":", 1)[1]), puts=1)  # prompt.wav goes up, then S3 is gone
    try:
        relayed = s3_settings(f"http://127.0.0.1:{relay.port}", "flaky/", attempts=1)
        settings = Settings(voices_dir=tmp_path, voices_s3=relayed)
        with ServerThread(create_app(engine, settings)) as server, server.client() as client:
            failed = upload(client, "Half")
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"]["type"] and "S3" in failed.json()["error"]["message"]
            assert relay.puts < 0  # the write really was cut after its first object
    finally:
        relay.close()
    # nothing visible: no manifest; the one data object written is unreferenced garbage at most
    assert not [k for k in keys(s3_url, "flaky/") if k.startswith("flaky/voices/")]
    store = S3VoiceStore(s3_settings(s3_url, "flaky/"))
    assert store.entries() == [] and not store.has("Half")
    healthy = Settings(voices_dir=tmp_path, voices_s3=s3_settings(s3_url, "flaky/"))
    with ServerThread(create_app(engine, healthy)) as server, server.client() as client:
        assert client.get("/voices").json()["data"] == []
        assert upload(client, "Half").status_code == 201


def test_two_processes_committing_one_name_one_wins(s3_url):
    first, second = (S3VoiceStore(s3_settings(s3_url, "race/")) for _ in range(2))
    files = {"prompt.wav": prompt_wav(1.0), "voice.json": b"{}"}
    staged = [store.stage("Same", files) for store in (first, second)]
    first.commit(staged[0])
    with pytest.raises(FileExistsError):  # If-None-Match: the bucket refuses the second manifest
        second.commit(staged[1])
    second.discard(staged[1])
    assert len([k for k in keys(s3_url, "race/") if k.endswith("prompt.wav")]) == 1


def test_names_that_differ_only_in_case_cannot_both_be_created(s3_url):
    """Each process lists the bucket through a 2 s cache, so the library's own check cannot see
    a name another process is creating: the bucket decides, by a claim per name as the library
    compares names (case folded); a claim without its voice (a write in progress) holds too."""
    first, second = (S3VoiceStore(s3_settings(s3_url, "case/")) for _ in range(2))
    files = {"prompt.wav": prompt_wav(1.0), "voice.json": b"{}"}
    staged = [first.stage("Tmp", files), second.stage("TMP", files)]
    first.commit(staged[0])
    with pytest.raises(FileExistsError, match="Tmp"):
        second.commit(staged[1])
    second.discard(staged[1])
    assert second.entries() == ["Tmp"]
    first.remove("Tmp")  # releases the name
    again = second.stage("TMP", files)
    second.commit(again)
    assert first.entries() == ["TMP"]
    # a claim whose voice is still being written holds its name as well
    boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").put_object(
        Bucket=BUCKET, Key="case/names/bob.claim", Body=b"Bob"
    )
    with pytest.raises(FileExistsError, match="Bob"):
        first.commit(first.stage("BOB", files))
    second.remove("TMP")
    assert keys(s3_url, "case/names/") == ["case/names/bob.claim"]


def test_a_delete_removes_only_the_voice_it_read(s3_url):
    """One process deletes "Same" while its delete is held on the way to the bucket; meanwhile
    another deletes it and creates it again. The held delete, when it arrives, must not take the
    new voice, nor its name's claim, with it."""
    relay = Relay(int(s3_url.rsplit(":", 1)[1]), puts=10**9)
    late = S3VoiceStore(s3_settings(f"http://127.0.0.1:{relay.port}", "redo/", attempts=1))
    other = S3VoiceStore(s3_settings(s3_url, "redo/"))
    other.commit(other.stage("Same", {"prompt.wav": prompt_wav(1.0), "voice.json": b'{"n": 1}'}))
    relay.held = b"DELETE "
    relay.flowing.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(late.remove, "Same")
            time.sleep(0.5)
            assert not deleting.done()  # it has read the voice; its DELETE waits in the relay
            other.remove("Same")
            files = {"prompt.wav": prompt_wav(1.0), "voice.json": b'{"n": 2}'}
            other.commit(other.stage("Same", files))
            relay.flowing.set()
            with pytest.raises(FileNotFoundError):  # the voice it read was deleted by the other
                deleting.result(timeout=30)
    finally:
        relay.flowing.set()
        relay.close()
    assert other.entries() == ["Same"] and other.read("Same", "voice.json") == b'{"n": 2}'
    assert "redo/names/same.claim" in keys(s3_url, "redo/")
    with pytest.raises(FileExistsError, match="Same"):  # the claim still holds the name
        other.commit(other.stage("SAME", files))


@contextlib.contextmanager
def hung_bucket(engine, s3_url: str, tmp_path, prefix: str, held: bytes = b"", **options):
    """A running server whose voices live in a bucket behind a ``Relay``, with voice "saved"
    stored; then the bucket hangs (the requests that start with ``held`` held; b"": every one)
    until ``relay.flowing`` is set or the block ends. Yields (client, relay, voice library)."""
    relay = Relay(int(s3_url.rsplit(":", 1)[1]), puts=10**9)
    settings = Settings(
        voices_dir=tmp_path / "unused",
        voices_s3=s3_settings(f"http://127.0.0.1:{relay.port}", prefix),
        **options,
    )
    try:
        with ServerThread(create_app(engine, settings)) as running, running.client() as c:
            assert upload(c, "saved").status_code == 201
            time.sleep(CACHE_TTL + 0.2)  # the next look at the library asks the bucket
            relay.held = held
            relay.flowing.clear()
            try:
                yield c, relay, running.app.state.server.library
            finally:
                relay.flowing.set()
    finally:
        relay.close()


def test_a_hung_bucket_holds_up_only_the_requests_that_need_it(engine, s3_url, tmp_path):
    """The usual outage: the bucket takes connections and never answers. The voice storage is
    read and written on threads of their own, never on the event loop (which answers every
    client) nor the engine loop (which steps every synthesis): while a listing, a saved voice's
    synthesis and a voice being saved wait for the bucket, /health and a preset's synthesis are
    answered at once, /ready and /metrics within a second (/ready then says the storage is
    degraded); all of them finish once the bucket answers again."""
    preset = engine.voices()[0]
    speak = {"text": "你好。", "seed": 1}
    with (
        ThreadPoolExecutor(10) as pool,
        hung_bucket(engine, s3_url, tmp_path, "hung/") as (c, relay, _),
    ):
        waiting = [
            pool.submit(c.get, "/voices"),
            pool.submit(upload, c, "second"),
            # more than a default executor's threads on 2 cores (6) wait on the bucket
            *(pool.submit(c.post, "/tts", json={**speak, "speaker": "saved"}) for _ in range(8)),
        ]
        time.sleep(0.5)
        started = time.monotonic()
        assert c.get("/health").status_code == 200
        assert c.post("/tts", json={**speak, "speaker": preset}).status_code == 200
        assert time.monotonic() - started < 4
        # the probes answer too, the storage checked in the background: degraded once a check
        # has waited HEALTH_HUNG seconds (the previous state until then)
        started = time.monotonic()
        assert c.get("/metrics").status_code == 200
        assert c.get("/ready").status_code == 200
        assert time.monotonic() - started < 2 * HEALTH_WAIT + 1
        assert wait_for(lambda: c.get("/ready").json()["status"] == "degraded", HEALTH_HUNG + 3)
        assert "not answered" in c.get("/ready").json()["storage"]["error"]
        assert not any(future.done() for future in waiting)
        relay.flowing.set()
        listing, created, *spoken = (future.result(timeout=60) for future in waiting)
        assert listing.status_code == 200
        assert [r.status_code for r in spoken] == [200] * 8
        assert created.status_code == 201, created.text


def test_requests_beyond_the_storage_waiters_are_refused_at_once(engine, s3_url, tmp_path):
    """However many clients ask for a hung bucket's voices, at most ``storage_waiters`` calls
    wait on it; the next request is answered 503 with Retry-After at once (not after the S3
    timeouts), a preset's synthesis still runs, the refusals do not count as storage failures,
    and the waiting requests finish once the bucket answers."""
    speak = {"text": "你好。", "seed": 1, "speaker": "saved"}
    with (
        ThreadPoolExecutor(2) as pool,
        hung_bucket(engine, s3_url, tmp_path, "bounded/", storage_waiters=2) as (c, relay, lib),
    ):
        waiting = [pool.submit(c.post, "/tts", json=speak) for _ in range(2)]
        assert wait_for(lambda: lib.storage_waiting == 2, 10)  # both wait on the bucket
        assert not any(future.done() for future in waiting)
        started = time.monotonic()
        refused = [c.post("/tts", json=speak), c.get("/voices")]
        assert time.monotonic() - started < 2
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            error = response.json()["error"]
            assert error["code"] == "storage_unavailable"
            assert "not keeping up: 2 requests are waiting" in error["message"]
        assert c.post("/tts", json={**speak, "speaker": engine.voices()[0]}).status_code == 200
        assert "voice_storage_waiting 2\n" in c.get("/metrics").text
        assert not any(future.done() for future in waiting)
        relay.flowing.set()
        assert [f.result(timeout=60).status_code for f in waiting] == [200, 200]
        assert c.post("/tts", json=speak).status_code == 200
        assert wait_for(lambda: c.get("/ready").json()["status"] == "ready", 15)


def test_waits_behind_a_hung_delete_count_against_the_storage_waiters(engine, s3_url, tmp_path):
    """A delete holds the library's write lock while the bucket does not answer; a second
    delete of the voice waiting for that lock counts as a storage wait too, so with
    ``storage_waiters=2`` a third request needing the storage is refused at once (503, never a
    404 for a voice that exists); once the bucket answers, the first delete succeeds and the
    second finds the voice gone (404)."""
    with (
        ThreadPoolExecutor(2) as pool,
        hung_bucket(engine, s3_url, tmp_path, "deleting/", held=b"DELETE ", storage_waiters=2) as (
            c,
            relay,
            lib,
        ),
    ):
        first = pool.submit(c.delete, "/voices/saved")
        assert wait_for(lambda: lib.storage_waiting == 1, 10)  # its DELETE is held
        second = pool.submit(c.delete, "/voices/saved")
        assert wait_for(lambda: lib.storage_waiting == 2, 10)  # behind the write lock
        started = time.monotonic()
        refused = c.post("/tts", json={"text": "你好。", "seed": 1, "speaker": "saved"})
        assert time.monotonic() - started < 2
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"
        assert not first.done() and not second.done()
        relay.flowing.set()
        assert first.result(timeout=60).status_code == 200
        assert second.result(timeout=60).status_code == 404
        assert lib.storage_waiting == 0


def test_a_manifest_stored_but_answered_with_an_error_is_saved(engine, s3_url, tmp_path):
    """The manifest PUT reaches the bucket, but its answer is lost (500 on every retry, as from a
    gateway failing after forwarding). The manifest read again tells: the voice was saved (201,
    usable, deletable). When the manifest cannot be read either, 503 says it may or may not have
    been, and its data stays (never a manifest naming deleted data): it was, and is whole. A PUT
    that never reached the bucket is 503, the voice absent, and the write leaves nothing: its
    data objects and its name's claim were kept (every retry leaked two more objects, and the
    claim held the name from other spellings for a minute); the name can be saved at once."""
    proxy = FaultProxy(s3_url)
    manifests = f"/{BUCKET}/lost/voices/"

    def fail(put: str, get: str = "ok") -> Callable[[str, str], str]:
        def rule(method: str, path: str) -> str:
            if path.startswith(manifests):
                return {"PUT": put, "GET": get}.get(method, "ok")
            return "ok"

        return rule

    def usable(client, name: str) -> None:
        listed = client.get("/voices").json()
        assert [v["name"] for v in listed["data"]] == [name] and not listed.get("broken"), listed
        spoken = client.post("/tts", json={"text": "你好。", "speaker": name, "seed": 1})
        assert spoken.status_code == 200, spoken.text

    settings = Settings(voices_dir=tmp_path / "unused", voices_s3=s3_settings(proxy.url, "lost/"))
    try:
        with ServerThread(create_app(engine, settings)) as server, server.client() as client:
            proxy.rule = fail(put="lost")
            saved = upload(client, "alice")
            assert saved.status_code == 201, saved.text
            assert ("PUT", manifests + "alice.json", "lost") in proxy.seen
            proxy.rule = fail(put="ok")
            usable(client, "alice")
            assert client.delete("/voices/alice").status_code == 200
            assert keys(s3_url, "lost/") == []

            proxy.rule = fail(put="lost", get="500")
            unclear = upload(client, "bob")
            assert unclear.status_code == 503, unclear.text
            assert "may or may not have been saved" in unclear.json()["error"]["message"]
            assert ("PUT", manifests + "bob.json", "lost") in proxy.seen
            proxy.rule = fail(put="ok")
            usable(client, "bob")
            assert client.delete("/voices/bob").status_code == 200
            assert keys(s3_url, "lost/") == []

            proxy.rule = fail(put="500")
            for _ in range(2):  # (a client retrying)
                failed = upload(client, "carol")
                assert failed.status_code == 503, failed.text
                assert "S3" in failed.json()["error"]["message"]
            assert keys(s3_url, "lost/") == []  # (the manifest read back twice: absent)
            proxy.rule = fail(put="ok")
            assert client.get("/voices/carol").status_code == 404
            assert client.get("/voices").json()["data"] == []
            assert upload(client, "Carol").status_code == 201  # (the name not held by a claim)
            usable(client, "Carol")
            assert client.delete("/voices/Carol").status_code == 200
    finally:
        proxy.close()
    assert keys(s3_url, "lost/") == []
