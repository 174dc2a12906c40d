"""Issue 11, the voice library tolerating its own files and its storage: normalised,
case-insensitive names with a byte limit; broken voices listed with a reason without breaking
listing, /speakers or /metrics; damaged stored data a clean 5xx; full or read-only storage 507/503
with /ready degraded (real tmpfs mounts; skipped where mounting is not allowed)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from test_server_support import ServerThread, metric, prompt_wav, tiny_engine

from cosyvoice_lite.frontend.prompt import PromptFeatures
from cosyvoice_lite.serving import Settings, create_app
from cosyvoice_lite.serving.voices import LocalVoiceStore, StorageError, VoiceLibrary


@pytest.fixture(scope="module")
def engine(v1_dir):
    return tiny_engine(v1_dir)


def serve(engine, voices_dir):
    return ServerThread(create_app(engine, Settings(voices_dir=voices_dir)))


def upload(client, name, audio=None, prompt_text="希望你以后能够做的比我还好呦。"):
    return client.post(
        "/voices",
        data={"name": name, "prompt_text": prompt_text},
        files={"audio": ("p.wav", audio or prompt_wav(1.0), "audio/wav")},
    )


def error_of(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_names_are_normalised_and_unique_without_case(engine, tmp_path):
    with serve(engine, tmp_path) as running, running.client() as c:
        assert upload(c, "Alice").status_code == 201
        for same in ("ALICE", "alice", "Ａｌｉｃｅ", "Alice\n"):  # case, full-width, stripped
            error_of(upload(c, same), 409, "voice_exists")
        assert c.get("/voices/ＡＬＩＣＥ").json()["name"] == "Alice"
        # controls, a format char, > 128 bytes, a Cyrillic look-alike of "Alice"
        for bad in ("a\nb", "a\tb", "a\u200bb", "名" * 50, "\u0410lice"):
            error_of(upload(c, bad), 400, "invalid_name")
        error_of(c.get("/voices/Alice%0A"), 400, "invalid_name")
        long_name = "名" * 50
        error_of(c.get(f"/voices/{long_name}"), 400, "invalid_name")
        error_of(c.delete(f"/voices/{long_name}"), 400, "invalid_name")
        error_of(c.post("/tts", json={"text": "你好", "speaker": long_name}), 404)
        assert upload(c, "Алиса").status_code == 201  # one script: fine
        assert [v["name"] for v in c.get("/voices").json()["data"]] == ["Alice", "Алиса"]
        assert c.delete("/voices/Алиса").status_code == 200
        assert c.delete("/voices/alice").status_code == 200
        assert c.get("/voices").json()["data"] == []


def test_a_recording_too_loud_to_give_features_is_refused_not_stored(engine, tmp_path):
    """Float samples of ~1e30 are finite, but their power overflows: a 400 naming the audio,
    at upload and when cloning, not a voice stored that every later request would refuse."""
    import io

    import numpy as np
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(prompt_wav(2.0)), dtype="float32")
    loud = io.BytesIO()
    sf.write(loud, samples * np.float32(1e30), rate, format="WAV", subtype="FLOAT")
    with serve(engine, tmp_path) as running, running.client() as c:
        error = error_of(upload(c, "loud", loud.getvalue()), 400, "invalid_audio")
        assert error["param"] == "audio" and "far outside" in error["message"]
        error_of(c.get("/voices/loud"), 404)
        files = {"prompt_wav": ("p.wav", loud.getvalue(), "audio/wav")}
        error = error_of(c.post("/tts/upload", data={"text": "你好"}, files=files), 400)
        assert error["param"] == "prompt_wav"
        # as a voice conversion's source too (it was tokenised from infinite features: zeros)
        files = {"source_wav": ("s.wav", loud.getvalue(), "audio/wav"),
                 "prompt_wav": ("p.wav", prompt_wav(2.0), "audio/wav")}  # fmt: skip
        error = error_of(c.post("/tts/upload", data={"format": "wav"}, files=files), 400)
        assert "far outside" in error["message"]


def write_voice(root, folder: str, meta: bytes | None, wav: bool = True) -> None:
    path = root / folder
    path.mkdir()
    if meta is not None:
        (path / "voice.json").write_bytes(meta)
    if wav:
        (path / "prompt.wav").write_bytes(prompt_wav(1.0))


def test_broken_voices_are_listed_and_break_nothing(engine, tmp_path):
    good = {
        "name": "x",
        "prompt_text": "hi",
        "duration": 1.0,
        "sample_rate": 16000,
        "created_at": 1.0,
    }
    write_voice(
        tmp_path, "badfield", json.dumps({**good, "name": "badfield", "duration": "abc"}).encode()
    )
    write_voice(tmp_path, "truncated", json.dumps({**good, "name": "truncated"}).encode()[:20])
    write_voice(tmp_path, "mismatch", json.dumps({**good, "name": "other"}).encode())
    write_voice(tmp_path, "nowav", json.dumps({**good, "name": "nowav"}).encode(), wav=False)
    with serve(engine, tmp_path) as running, running.client() as c:
        assert upload(c, "fine").status_code == 201
        listing = c.get("/voices")
        assert listing.status_code == 200
        assert [v["name"] for v in listing.json()["data"]] == ["fine"]
        broken = {b["name"]: b["reason"] for b in listing.json()["broken"]}
        assert set(broken) == {"badfield", "truncated", "mismatch", "nowav"}
        assert "duration" in broken["badfield"] and "JSON" in broken["truncated"]
        assert "name" in broken["mismatch"] and "prompt.wav" in broken["nowav"]
        assert all(str(tmp_path) not in reason for reason in broken.values())
        assert c.get("/speakers").status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "cosyvoice_broken_voices") == 4
        assert metric(text, "cosyvoice_saved_voices") == 1
        unknown = error_of(c.post("/tts", json={"text": "你好", "speaker": "nobody"}), 404)
        assert str(tmp_path) not in unknown["message"]
        damaged = error_of(
            c.post("/tts", json={"text": "你好", "speaker": "badfield"}), 500, "voice_damaged"
        )
        assert str(tmp_path) not in damaged["message"] and "<" not in damaged["message"]
        error_of(upload(c, "BADFIELD"), 409, "voice_exists")  # still taken until deleted
        assert c.delete("/voices/badfield").status_code == 200
        assert "badfield" not in {b["name"] for b in c.get("/voices").json()["broken"]}


def test_corrupted_stored_prompt_is_a_clean_server_error(engine, tmp_path):
    with serve(engine, tmp_path) as running, running.client() as c:
        assert upload(c, "bob").status_code == 201
    (tmp_path / "bob" / "prompt.wav").write_bytes(b"RIFF garbage")
    for cached in (tmp_path / "bob" / "features").iterdir():
        cached.unlink()
    with serve(engine, tmp_path) as running, running.client() as c:
        error = error_of(
            c.post("/tts", json={"text": "你好", "speaker": "bob"}), 500, "voice_damaged"
        )
        assert error["type"] == "server_error"
        assert str(tmp_path) not in error["message"] and "object at" not in error["message"]


# ---------------------------------------------------------------------------------- storage


@contextlib.contextmanager
def tmpfs(path, size: str = "2m"):
    path.mkdir(exist_ok=True)
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def test_full_storage_is_507_and_ready_says_degraded(engine, tmp_path):
    with tmpfs(tmp_path / "mnt") as root, serve(engine, root) as running, running.client() as c:
        assert c.get("/ready").json()["status"] in ("ready", "degraded")
        with open(root / ".filler", "wb") as f, contextlib.suppress(OSError):  # fill it up
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        error = error_of(upload(c, "carol"), 507, "insufficient_storage")
        assert "full" in error["message"] and str(root) not in error["message"]
        ready = c.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["storage"]["voices"] == "degraded"
        assert metric(c.get("/metrics").text, "cosyvoice_voice_storage_ok") == 0
        assert c.get("/voices").status_code == 200
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written


def test_read_only_storage_is_503_and_features_are_served_from_memory(engine, tmp_path):
    with tmpfs(tmp_path / "mnt", "64m") as root:
        with serve(engine, root) as running, running.client() as c:
            assert upload(c, "dave").status_code == 201
        for cached in (root / "dave" / "features").iterdir():
            cached.unlink()  # the next server must compute and (try to) cache them
        remount(root, "ro")
        with serve(engine, root) as running, running.client() as c:
            error = error_of(upload(c, f"erin{uuid.uuid4().hex[:4]}"), 503, "storage_unavailable")
            assert "read-only" in error["message"]
            error_of(c.delete("/voices/dave"), 503, "storage_unavailable")
            assert c.get("/ready").json()["status"] == "degraded"
            for _ in range(2):  # the cache cannot be written: served anyway, every time
                response = c.post("/tts", json={"text": "你好", "speaker": "dave", "seed": 1})
                assert response.status_code == 200, response.text
        remount(root, "rw")


def test_a_saved_voice_is_ready_for_streaming_before_its_first_stream(tmp_path):
    """CosyVoice2: saving a voice computes its prompt frames through the streaming flow in the
    background, so even its first stream finds them computed."""
    import time
    from pathlib import Path

    engine = tiny_engine(Path(__file__).parent / "data" / "models" / "v2-tiny")
    flows = engine.pipeline.prompt_flows
    flows.clear()
    with serve(engine, tmp_path) as running, running.client() as c:
        misses = flows.misses
        assert upload(c, "Ready", audio=prompt_wav(3.0)).status_code == 201
        deadline = time.monotonic() + 60
        while len(flows) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(flows) == 1 and flows.misses == misses + 1
        hits = flows.hits
        r = c.post(
            "/tts", json={"text": "你好，今天天气很好。", "speaker": "Ready", "stream": True}
        )
        assert r.status_code == 200 and len(r.content) > 0
        assert flows.misses == misses + 1 and flows.hits == hits + 1


def test_a_cloned_voice_stored_with_the_model_is_spoken_as_one(tmp_path):
    """CosyVoice2's spk2info.pt holds 'zero_shot_zh', a cloned voice (prompt features), beside
    its presets: the page's first voice. It speaks zero-shot (with an instruction: instruct),
    not as a preset, which it cannot (every route answered 400)."""
    from pathlib import Path

    engine = tiny_engine(Path(__file__).parent / "data" / "models" / "v2-tiny")
    assert engine.presets["zero_shot_zh"].kind == "prompt"
    with serve(engine, tmp_path) as running, running.client() as c:
        for body in ({}, {"mode": "zero_shot"}, {"instruct": "用开心的语气说"}):
            r = c.post(
                "/tts", json={"text": "你好。", "speaker": "zero_shot_zh", "seed": 1, **body}
            )
            assert r.status_code == 200, (body, r.text)
        error_of(
            c.post("/tts", json={"text": "你好。", "speaker": "zero_shot_zh", "mode": "preset"}),
            400,
        )
        r = c.post("/tts", json={"text": "你好。", "speaker": "中文女", "seed": 1})
        assert r.status_code == 200  # a real preset still speaks as one
        # a real preset cannot take an instruction on CosyVoice2 (it needs a cloned voice)
        instructed = {"text": "你好。", "speaker": "中文女", "instruct": "用开心的语气说"}
        error = error_of(c.post("/tts", json=instructed), 400, "unsupported_instructions")
        assert error["param"] == "instruct"
        body = {"model": "tts-1", "voice": "中文女", "input": "你好。", "instructions": "开心"}
        error = error_of(c.post("/v1/audio/speech", json=body), 400, "unsupported_instructions")
        assert error["param"] == "instructions"
        # listed as what it is (the page offers it where cloned voices go)
        kinds = {s["name"]: s["kind"] for s in c.get("/speakers").json()["speakers"]}
        assert kinds["zero_shot_zh"] == "cloned" and kinds["中文女"] == "preset"
        listed = {v["id"]: v["kind"] for v in c.get("/v1/audio/voices").json()["data"]}
        assert listed["zero_shot_zh"] == "cloned" and listed["中文女"] == "preset"


def test_saved_voices_are_prepared_when_a_server_starts(tmp_path):
    """A server (a restart, a new replica) prepares the most recently saved voices for streaming
    once its model is loaded: at most ``prepare_voices``, newest first; 0 prepares none."""
    import time
    from pathlib import Path

    engine = tiny_engine(Path(__file__).parent / "data" / "models" / "v2-tiny")
    flows = engine.pipeline.prompt_flows
    off = Settings(voices_dir=tmp_path, prepare_voices=0)
    with ServerThread(create_app(engine, off)) as running, running.client() as c:
        for name, seconds in (("Older", 3.0), ("Newer", 3.5)):
            assert upload(c, name, audio=prompt_wav(seconds)).status_code == 201
            time.sleep(1.1)  # distinct creation times (whole seconds on some stores)
    deadline = time.monotonic() + 60
    while len(flows) < 2 and time.monotonic() < deadline:  # saving prepares each, as ever
        time.sleep(0.05)
    flows.clear()
    with ServerThread(create_app(engine, off)):
        time.sleep(0.5)
        assert len(flows) == 0
    one = Settings(voices_dir=tmp_path, prepare_voices=1)
    with ServerThread(create_app(engine, one)) as running, running.client() as c:
        deadline = time.monotonic() + 60
        while len(flows) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(flows) == 1
        hits, misses = flows.hits, flows.misses
        for name in ("Newer", "Older"):
            r = c.post(
                "/tts", json={"text": "你好，今天天气很好。", "speaker": name, "stream": True}
            )
            assert r.status_code == 200 and len(r.content) > 0
        assert (flows.hits, flows.misses) == (hits + 1, misses + 1)  # only the newest was ready


def test_preparing_voices_at_start_keeps_the_voices_already_kept(tmp_path):
    """Without eviction (what a starting server asks for), a voice that does not fit beside
    those kept is not kept, and they stay."""
    from pathlib import Path

    from cosyvoice_lite.engine import Engine

    engine = Engine.load(Path(__file__).parent / "data" / "models" / "v2-tiny")
    try:
        text = "希望你以后能够做的比我还好呦。"
        # long enough that what they take is known before they are computed (a prompt that
        # primes fewer than cache.MIN_CAPACITY tokens is estimated with spare rows)
        voices = [engine.encode_prompt(prompt_wav(s), text) for s in (3.5, 4.5)]
        flows = engine.pipeline.prompt_flows
        assert engine.prepare_voice(voices[0]).result(timeout=120) is True
        flows.budget_bytes = flows.nbytes + flows.nbytes // 2  # room for one voice of this size
        assert engine.prepare_voice(voices[1], evict=False).result(timeout=120) is False
        assert len(flows) == 1
        assert engine.prepare_voice(voices[0], evict=False).result(timeout=120) is True  # kept
        assert engine.prepare_voice(voices[1]).result(timeout=120) is True  # evicts the older
        assert len(flows) == 1
    finally:
        engine.close()


def test_both_voice_routes_read_a_form_the_same_way(engine, tmp_path):
    """POST /voices and POST /v1/audio/voices share one reader: a blank transcript field counts
    as none, two different transcripts are refused (either could be meant; compared as stored,
    without the spaces around them), and the cheap checks name the field before the recording
    is opened."""
    sample = ("p.wav", prompt_wav(1.0), "audio/wav")
    with serve(engine, tmp_path) as running, running.client() as c:
        for route, audio in (("/voices", "audio"), ("/v1/audio/voices", "audio_sample")):
            name = "v" + route.replace("/", "-")
            made = c.post(
                route,
                data={"name": name, "prompt_text": "  ", "transcript": "你好。"},
                files={audio: sample},
            )
            assert made.status_code == 201, made.text
            assert made.json()["prompt_text"] == "你好。"
            twice = {"name": "x", "prompt_text": "你好。", "transcript": "再见。"}
            error = error_of(c.post(route, data=twice, files={audio: sample}), 400, "invalid_field")
            assert error["param"] == "transcript" and "two different" in error["message"]
            same = {"name": name + "2", "prompt_text": "你好。", "transcript": " 你好。"}
            assert c.post(route, data=same, files={audio: sample}).status_code == 201
            # the transcript's limit is checked before the junk recording is opened
            long = {"name": "y", "transcript": "好" * 1001}
            junk = {audio: ("p.wav", b"junk", "audio/wav")}
            error = error_of(c.post(route, data=long, files=junk), 400, "prompt_text_too_long")
            assert error["param"] == "transcript"
            error = error_of(c.post(route, data={"name": "z"}), 400, "missing_field")
            assert error["param"] == audio
        assert len(c.get("/voices").json()["data"]) == 4


def test_transcripts_are_checked_and_unescaped_as_texts_are(engine, tmp_path):
    """A transcript taken for a voice (saved, uploaded with a request or given as ref_text) is
    checked for tags the model does not know, naming the field the client sent, and ``\\[sic]``
    in it is text, as in the text to speak."""
    sample = ("p.wav", prompt_wav(1.0), "audio/wav")
    features = engine.encode_prompt(prompt_wav(1.0), "你好\\[sic]。")
    assert "[sic]" in features.prompt_text and "\\" not in features.prompt_text
    ref = "data:audio/wav;base64," + base64.b64encode(prompt_wav(1.0)).decode()
    with serve(engine, tmp_path) as running, running.client() as c:
        for route, audio in (("/voices", "audio"), ("/v1/audio/voices", "audio_sample")):
            bad = {"name": "bad", "transcript": "你好[sic]。"}
            error = error_of(c.post(route, data=bad, files={audio: sample}), 400)
            assert error["param"] == "transcript" and "[sic]" in error["message"]
            escaped = {"name": "ok" + route.replace("/", "-"), "transcript": "你好\\[sic]。"}
            assert c.post(route, data=escaped, files={audio: sample}).status_code == 201
        own = {"text": "你好。", "prompt_text": "你好\\[breath]。"}
        error = error_of(c.post("/tts/upload", data=own, files={"prompt_wav": sample}), 400)
        assert error["param"] == "prompt_text" and "own markup" in error["message"]
        fine = {"text": "你好。", "prompt_text": "你好\\[sic]。", "seed": "1"}
        assert c.post("/tts/upload", data=fine, files={"prompt_wav": sample}).status_code == 200
        body = {"model": "tts-1", "input": "你好。", "ref_audio": ref, "ref_text": "你好[sic]。"}
        error = error_of(c.post("/v1/audio/speech", json=body), 400)
        assert error["param"] == "ref_text"


def test_features_computed_from_a_voice_replaced_meanwhile_are_not_stored_in_the_new_one(
    tmp_path,
):
    """A voice deleted and created again (another recording) while features of the old one
    were being computed: they are neither saved into the new voice nor a storage failure; the
    new voice's features come from its own recording."""
    import threading
    from pathlib import Path

    import torch

    from cosyvoice_lite.frontend.prompt import PromptFeatures
    from cosyvoice_lite.serving.voices import VoiceLibrary

    old, new = prompt_wav(1.0), Path("tests/data/audio/zh_16k.wav").read_bytes()
    entered, release = threading.Event(), threading.Event()

    def encode(audio: bytes, text: str, wait: bool = False) -> PromptFeatures:
        if wait:
            entered.set()
            release.wait(30)
        marker = float(len(audio))  # which recording the features came from
        return PromptFeatures(
            torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 8, 80),
            torch.full((1, 192), marker), text,
        )  # fmt: skip

    library = VoiceLibrary(tmp_path)
    library.create("bob", old, "old", "k1", encode)
    worker = threading.Thread(
        target=lambda: library.features("bob", "k2", lambda a, t: encode(a, t, wait=True))
    )
    worker.start()
    assert entered.wait(30)
    library.delete("bob")
    library.create("bob", new, "new", "k1", encode)
    release.set()
    worker.join(30)
    assert library.health() is None  # a voice replaced is not a storage failure
    fresh = VoiceLibrary(tmp_path)  # as after a restart: what is on disk
    embedding = fresh.features("bob", "k2", encode).embedding
    assert embedding[0, 0].item() == float(len(fresh.audio("bob")))


def test_the_library_holds_at_most_max_voices(engine, tmp_path):
    """No cap: a client filled the disk with voices (a 755 KB upload is 22 MB stored), and then
    results could not be saved either. Beyond --max-voices: 507, nothing stored, the features
    not computed; a deletion makes room."""
    server = ServerThread(create_app(engine, Settings(voices_dir=tmp_path, max_voices=2)))
    with server, server.client() as client:
        for name in ("one", "two"):
            assert upload(client, name).status_code == 201
        error = error_of(upload(client, "three"), 507, "insufficient_storage")
        assert "--max-voices" in error["message"]
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
            "one",
            "two",
        ]
        assert client.delete("/voices/one").status_code == 200
        assert upload(client, "three").status_code == 201


# ------------------------------------------------------------- several processes, one directory


def run_python(code: str, *args: str) -> subprocess.Popen:
    """Another process on the library (as another server sharing the directory would be)."""
    return subprocess.Popen([sys.executable, "-c", code, *args])


STAGE_AND_DIE = """
import os, sys
from cosyvoice_lite.serving.voices import LocalVoiceStore
LocalVoiceStore(sys.argv[1]).stage("dead", {"prompt.wav": b"x", "voice.json": b"{}"})
os._exit(1)  # killed while saving: its staging folder is left over
"""
OPEN_LIBRARY = (
    "import sys; from cosyvoice_lite.serving.voices import VoiceLibrary as V; V(sys.argv[1])"
)


def test_opening_the_library_removes_only_leftovers_never_another_process_s_work(tmp_path):
    """Opening the library (a server or replica starting on a shared --voices-dir) removed every
    .tmp-*/.trash-*, among them another live process's staging folder: its voice was committed
    without prompt.wav, answered 201 and broken ever after. Now only work folders whose process
    is gone (their lock free) or that have no lock (an older version's) are removed."""
    from cosyvoice_lite.serving.voices import LocalVoiceStore, VoiceLibrary, _claim, _unclaim

    assert run_python(STAGE_AND_DIE, str(tmp_path)).wait(60) == 1
    (tmp_path / ".tmp-old").mkdir()  # left by a version without locks
    (tmp_path / ".tmp-old" / "prompt.wav").write_bytes(b"x")
    assert len(list(tmp_path.iterdir())) == 3  # the dead process's folder, its lock, the old one
    store = LocalVoiceStore(tmp_path)
    staged = store.stage("live", {"prompt.wav": prompt_wav(1.0), "voice.json": b"{}"})  # saving
    trash, lock = _claim(tmp_path, ".trash-")  # ... and deleting a voice, in this process
    trash.mkdir()
    (trash / "prompt.wav").write_bytes(b"x")
    assert run_python(OPEN_LIBRARY, str(tmp_path)).wait(60) == 0
    live = [staged.folder.name, trash.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + [n + ".lock" for n in live])
    assert (trash / "prompt.wav").exists()
    store.commit(staged)
    assert sorted(p.name for p in (tmp_path / "live").iterdir()) == ["prompt.wav", "voice.json"]
    shutil.rmtree(trash)
    _unclaim(trash, lock)
    VoiceLibrary(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["live"]


def fake_encode(audio: bytes, text: str) -> PromptFeatures:
    return PromptFeatures(
        torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 8, 80), torch.zeros(1, 192), text
    )


def test_a_staged_voice_that_lost_its_files_is_never_committed(tmp_path):
    """A staging folder emptied under a save (by hand, or by a process ignoring the locks): the
    save fails (503), nothing is stored, and nothing is left behind."""

    class Emptied(LocalVoiceStore):
        def stage(self, name, files):
            staged = super().stage(name, files)
            (staged.folder / "prompt.wav").unlink()
            return staged

    library = VoiceLibrary(Emptied(tmp_path))
    with pytest.raises(StorageError) as failed:
        library.create("anna", prompt_wav(1.0), "hi", "k", fake_encode)
    assert failed.value.status == 503
    assert list(tmp_path.iterdir()) == []


CREATE_AT = """
import sys, time
from pathlib import Path
import torch
from cosyvoice_lite.frontend.prompt import PromptFeatures
from cosyvoice_lite.serving.voices import LocalVoiceStore, VoiceExistsError, VoiceLibrary

class SlowCommit(LocalVoiceStore):  # a slow disk: a wide window between the check and the commit
    def commit(self, staged):
        time.sleep(0.5)
        super().commit(staged)

def encode(audio, text):
    return PromptFeatures(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 8, 80),
                          torch.zeros(1, 192), text)

root, audio, name, go = sys.argv[1], Path(sys.argv[2]).read_bytes(), sys.argv[3], Path(sys.argv[4])
library = VoiceLibrary(SlowCommit(root))
Path(f"{go}.{name}").touch()  # ready
while not go.exists():
    time.sleep(0.002)
try:
    library.create(name, audio, "hi", "k", encode)
except VoiceExistsError:
    sys.exit(3)
"""


def test_two_processes_cannot_create_names_that_differ_only_in_case(tmp_path):
    """Two server processes sharing a directory, 'Race' through one and 'race' through the
    other at once: both were stored (the case-insensitive check and the commit were one step
    within a process only). Now one is stored, the other is told it exists."""
    root, audio, go = tmp_path / "voices", tmp_path / "p.wav", tmp_path / "go"
    audio.write_bytes(prompt_wav(1.0))
    names = ("Race", "race")
    racers = [run_python(CREATE_AT, str(root), str(audio), name, str(go)) for name in names]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.{name}").exists() for name in names) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both at once
    assert sorted(racer.wait(60) for racer in racers) == [0, 3]
    assert len([p for p in root.iterdir() if not p.name.startswith(".")]) == 1


def test_a_save_past_its_deadline_is_not_stored_unless_its_commit_began(
    engine, tmp_path, monkeypatch
):
    """POST /voices answered 504 while the save went on and stored the voice (a retry got 409).
    Now a save still computing at the deadline is dropped before its commit, and one whose
    commit began in time is answered 201 when it ends."""
    encode = engine.encode_prompt
    app = create_app(engine, Settings(voices_dir=tmp_path, request_timeout=1.5))
    with ServerThread(app) as running, running.client() as c:
        monkeypatch.setattr(engine, "encode_prompt", lambda *a: time.sleep(2.0) or encode(*a))
        error_of(upload(c, "Slow"), 504, "timeout")
        time.sleep(1.0)  # the save's thread ends meanwhile
        error_of(c.get("/voices/Slow"), 404)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # discarded
        monkeypatch.setattr(engine, "encode_prompt", encode)
        store = running.app.state.server.library.store._store
        commit = store.commit
        monkeypatch.setattr(store, "commit", lambda staged: time.sleep(2.0) or commit(staged))
        started = time.monotonic()
        assert upload(c, "Slow").status_code == 201  # past the deadline, but committed
        assert time.monotonic() - started > 1.5
        assert c.get("/voices/Slow").status_code == 200


def long_recording(library: VoiceLibrary, name: str, seconds: int = 29, rate: int = 48000) -> bytes:
    """Voice ``name`` saved with a long recording (stored as float32 WAV: ``seconds * rate * 4``
    bytes); returns the stored bytes."""
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(seconds * rate) / rate
    samples = 0.3 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    audio = io.BytesIO()
    sf.write(audio, samples.astype(np.float32), rate, format="FLAC")
    library.create(name, audio.getvalue(), "hi", "k", fake_encode, max_seconds=30)
    return library.audio(name)


def download(client, path: str) -> tuple[int, dict, str, int]:
    """A GET's status, headers, body (its SHA-256), and the most memory this process took at
    once meanwhile (tracemalloc): the client keeps only a digest, so what counts is the
    server's."""
    import hashlib
    import tracemalloc

    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        with client.stream("GET", path) as response:
            for chunk in response.iter_raw():
                digest.update(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return response.status_code, dict(response.headers), digest.hexdigest(), peak


def test_a_voice_recording_is_sent_as_it_is_read(engine, tmp_path):
    """GET /voices/{name}/audio read the whole stored recording into memory for each request
    (23 MB for 30 s at 192 kHz: 80 clients that did not read held 1.3 GB); now it is read and
    sent a chunk at a time: the same bytes and headers, its errors before anything is sent."""
    import hashlib

    stored = long_recording(VoiceLibrary(tmp_path), "Long", rate=96000)
    settings = Settings(voices_dir=tmp_path, prepare_voices=0)
    with ServerThread(create_app(engine, settings)) as running, running.client() as c:
        status, headers, digest, peak = download(c, "/voices/long/audio")
        error_of(c.get("/voices/nobody/audio"), 404, "voice_not_found")
        error_of(c.get("/voices/a%2Fb/audio"), 404)
    assert status == 200 and digest == hashlib.sha256(stored).hexdigest()
    assert headers["content-length"] == str(len(stored)) and headers["content-type"] == "audio/wav"
    assert headers["content-disposition"] == 'attachment; filename="long.wav"'
    assert peak < len(stored) / 4, (peak, len(stored))  # 11 MB sent, never held at once
    if Path("/proc/self/fd").is_dir():  # the file closed once sent
        opened = [str(fd.resolve()) for fd in Path("/proc/self/fd").iterdir()]
        assert not [f for f in opened if f.endswith("prompt.wav")], opened


def test_a_download_in_progress_outlives_the_voice_s_deletion(engine, tmp_path):
    """The recording is open before its answer starts: a voice deleted meanwhile (renamed away,
    then removed) is still sent whole, and the download holds no storage waiter."""
    library = VoiceLibrary(tmp_path)
    stored = long_recording(library, "going")
    opened = library.open_audio("going")
    first = next(opened)
    library.delete("going")
    assert len(first) < len(stored) and first + b"".join(opened) == stored
    stored = long_recording(library, "going")  # again, deleted through the server while sent
    settings = Settings(voices_dir=tmp_path, prepare_voices=0)
    with (
        ServerThread(create_app(engine, settings)) as running,
        running.client() as c,
        c.stream("GET", "/voices/going/audio") as response,
    ):
        chunks = response.iter_raw(64 * 1024)
        got = next(chunks)
        assert running.app.state.server.library.storage_waiting == 0
        assert c.delete("/voices/going").status_code == 200
        error_of(c.get("/voices/going"), 404, "voice_not_found")
        got += b"".join(chunks)
    assert response.status_code == 200 and got == stored
