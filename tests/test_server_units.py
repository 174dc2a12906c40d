"""Unit tests of the serving building blocks that need no model: the voice library (names,
atomic writes, persistence, feature cache), the streaming encoders and resampler, and metrics."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from test_server_support import decode, metric, prompt_wav

from cosyvoice_lite.audio.resample import resample
from cosyvoice_lite.errors import AudioError, InvalidRequestError, UnknownVoiceError
from cosyvoice_lite.frontend.prompt import PromptFeatures
from cosyvoice_lite.serving.metrics import Metrics
from cosyvoice_lite.serving.scheduler import Job, JobTimeout
from cosyvoice_lite.serving.streaming import Encoder, StreamResampler, WholeEncoder, wav_header
from cosyvoice_lite.serving.voices import (
    InvalidVoiceNameError,
    LocalVoiceStore,
    VoiceDamagedError,
    VoiceExistsError,
    VoiceLibrary,
    validate_name,
)


class CountingEncoder:
    """Stands in for engine.encode_prompt: deterministic features, counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, audio: bytes, prompt_text: str) -> PromptFeatures:
        self.calls += 1
        wav, rate = sf.read(io.BytesIO(audio), dtype="float32")
        n = max(1, len(wav) // 640)
        return PromptFeatures(
            torch.arange(n, dtype=torch.int32)[None],
            torch.full((1, 2 * n, 80), 0.5),
            torch.full((1, 192), float(rate)),
            prompt_text.lower(),
        )


# ---------------------------------------------------------------------------------- voice names


@pytest.mark.parametrize(
    "name", ["alice", "中文女", "my voice", "v-2.1_b", "A", "x" * 64, "Ünïcode", "_x", "_1-"]
)
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "..",
        ".",
        ".hidden",
        "a/b",
        "a\\b",
        "x" * 65,
        "trailing ",
        "trailing.",
        " lead",
        "a\x00b",
        "new\nline",
        "a..b",
        "/etc/passwd",
        "semi;colon",
        "star*",
        "-x",
    ],
)
def test_invalid_names(name):
    with pytest.raises(InvalidVoiceNameError):
        validate_name(name)


# ---------------------------------------------------------------------------------- library


def test_create_list_get_delete_and_persistence(tmp_path):
    encode = CountingEncoder()
    library = VoiceLibrary(tmp_path)
    info = library.create("anna", prompt_wav(1.5), "  Hello There  ", "v1-22050", encode)
    assert info.prompt_text == "Hello There" and info.sample_rate == 16000
    assert abs(info.duration - 1.5) < 1e-6
    assert [v.name for v in library.list()] == ["anna"] and library.exists("anna")
    assert encode.calls == 1

    # A new library object on the same directory (a restart) sees the voice and its features,
    # read from disk with weights_only=True, without recomputing them.
    again = VoiceLibrary(tmp_path)
    assert again.get("anna") == info
    features = again.features("anna", "v1-22050", encode)
    assert encode.calls == 1
    assert features.prompt_text == "hello there"
    stored = torch.load(tmp_path / "anna" / "features" / "v1-22050.pt", weights_only=True)
    assert set(stored) == {"speech_tokens", "speech_feat", "embedding", "prompt_text"}

    # Another model family computes its own features once, from the stored prompt, and keeps them.
    again.features("anna", "v2-24000", encode)
    again.features("anna", "v2-24000", encode)
    assert encode.calls == 2
    assert (tmp_path / "anna" / "features" / "v2-24000.pt").is_file()
    wav, rate = sf.read(again.audio_path("anna"), dtype="float32")
    assert rate == 16000 and len(wav) == 24000

    again.delete("anna")
    assert again.list() == [] and not (tmp_path / "anna").exists()
    with pytest.raises(UnknownVoiceError):
        again.get("anna")
    with pytest.raises(UnknownVoiceError):
        again.delete("anna")
    assert os.listdir(tmp_path) == []


def test_only_the_most_recently_used_voices_features_stay_in_memory(tmp_path):
    """A voice deleted through another process sharing the store is never noticed here, so the
    features kept in memory are bounded: the least recently used go (and are read again)."""
    encode = CountingEncoder()
    library = VoiceLibrary(tmp_path, features_kept=2)
    for name in ("anna", "bob", "cleo"):  # each kept as it is created: anna is dropped
        library.create(name, prompt_wav(1.5), "hi", "k", encode)
    for name in ("anna", "bob", "cleo"):  # from now on, only memory can spare an encoding
        (tmp_path / name / "features" / "k.pt").unlink()
    calls = encode.calls
    library.features("cleo", "k", encode)
    library.features("bob", "k", encode)
    assert encode.calls == calls  # both kept
    library.features("anna", "k", encode)  # computed again; cleo, least recently used, goes
    library.features("bob", "k", encode)
    assert encode.calls == calls + 1
    library.features("cleo", "k", encode)
    assert encode.calls == calls + 2


def test_a_voice_saved_under_a_name_no_longer_taken_is_still_found_and_deleted(tmp_path):
    """Names without a letter or digit ("__") were taken once: new ones are refused, but a voice
    stored under one stays usable and can be deleted (it had become broken for good)."""
    encode = CountingEncoder()
    library = VoiceLibrary(tmp_path)
    library.create("x__", prompt_wav(1.5), "hi", "k", encode)
    (tmp_path / "x__").rename(tmp_path / "__")  # as an earlier version stored it
    meta = json.loads((tmp_path / "__" / "voice.json").read_text())
    (tmp_path / "__" / "voice.json").write_text(json.dumps({**meta, "name": "__"}))
    library = VoiceLibrary(tmp_path)
    assert [v.name for v in library.list()] == ["__"] and library.get("__").name == "__"
    with pytest.raises(InvalidVoiceNameError, match="letter or digit"):
        library.create("_-", prompt_wav(1.5), "hi", "k", encode)
    library.delete("__")
    assert library.list() == [] and os.listdir(tmp_path) == []


class ListedSlowly(LocalVoiceStore):
    """A local store whose first listing waits until ``go`` is set."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.go, self.listing = threading.Event(), threading.Event()

    def entries(self) -> list[str]:
        if not self.listing.is_set():
            self.listing.set()
            assert self.go.wait(30)
        return super().entries()


def test_a_listing_of_a_local_directory_shows_what_other_processes_saved_before_it(tmp_path):
    """Listings at once shared one scan: a listing begun after another process had saved a
    voice joined one begun before, and missed it (a bucket's listing may lag, documented; a
    local directory's may not)."""
    encode = CountingEncoder()
    store = ListedSlowly(tmp_path)
    library = VoiceLibrary(store)
    earlier = threading.Thread(target=library.list)
    earlier.start()
    assert store.listing.wait(30)
    VoiceLibrary(tmp_path).create("newcomer", prompt_wav(1.5), "hi", "k", encode)  # elsewhere
    later: list[str] = []
    reader = threading.Thread(target=lambda: later.extend(v.name for v in library.list()))
    reader.start()
    reader.join(timeout=30)
    store.go.set()
    earlier.join(timeout=30)
    assert later == ["newcomer"]


class DeletedWhileChecked(LocalVoiceStore):
    """A local store whose voices are deleted (by another request) as their files are checked."""

    def has_file(self, name: str, file: str) -> bool:
        self.remove(name)
        return super().has_file(name, file)


class DeletedWhileRead(LocalVoiceStore):
    """... and as their stored prompt is read."""

    def read(self, name: str, file: str) -> bytes:
        if file == "prompt.wav":
            self.remove(name)
            raise FileNotFoundError(file)
        return super().read(name, file)


def test_a_voice_deleted_while_it_is_read_is_gone_not_damaged(tmp_path):
    """A DELETE racing a request that uses the voice: the request gets 'unknown voice' (404),
    not 'damaged' (500), and a listing does not call it broken."""
    encode = CountingEncoder()
    VoiceLibrary(tmp_path).create("anna", prompt_wav(1.5), "hi", "k", encode)
    with pytest.raises(UnknownVoiceError):
        VoiceLibrary(DeletedWhileChecked(tmp_path)).get("anna")
    VoiceLibrary(tmp_path).create("anna", prompt_wav(1.5), "hi", "k", encode)
    assert VoiceLibrary(DeletedWhileChecked(tmp_path)).scan() == ([], [])
    VoiceLibrary(tmp_path).create("bob", prompt_wav(1.5), "hi", "k", encode)
    with pytest.raises(UnknownVoiceError):  # features of another model: from the stored prompt
        VoiceLibrary(DeletedWhileRead(tmp_path)).features("bob", "other", encode)


def test_a_transcript_another_model_cannot_read_is_not_damage(tmp_path):
    """A library shared by servers of two versions: a CosyVoice2 voice's transcript with a tag
    CosyVoice-300M does not know was called damaged there (500, "delete it and create it
    again", which loses a voice the other server uses). It is the request's problem (400 naming
    the voice); a stored recording that cannot be decoded is still damage."""
    from cosyvoice_lite.frontend.markup import V1_TAGS, check_markup

    library = VoiceLibrary(tmp_path)
    library.create("anna", prompt_wav(1.5), "[quick_breath] 你好", "v2", CountingEncoder())

    def v1_encoder(audio: bytes, prompt_text: str) -> PromptFeatures:
        check_markup([prompt_text], V1_TAGS, "CosyVoice-300M")  # as encode_prompt does
        raise AssertionError("the tag is not CosyVoice-300M's")

    with pytest.raises(InvalidRequestError, match="transcript this model cannot read") as info:
        library.features("anna", "v1", v1_encoder)
    assert not isinstance(info.value, VoiceDamagedError) and info.value.param == "voice"

    def undecodable(audio: bytes, prompt_text: str) -> PromptFeatures:
        raise AudioError("prompt audio could not be decoded")

    with pytest.raises(VoiceDamagedError):
        library.features("anna", "v3", undecodable)


def test_duplicate_and_bad_audio(tmp_path):
    library = VoiceLibrary(tmp_path)
    library.create("bob", prompt_wav(1.0), "hi", "k", CountingEncoder())
    with pytest.raises(VoiceExistsError):
        library.create("bob", prompt_wav(1.0), "hi", "k", CountingEncoder())
    with pytest.raises(AudioError):
        library.create("silent", prompt_wav(1.0, amplitude=0.0), "hi", "k", CountingEncoder())
    with pytest.raises(AudioError):
        library.create("short", prompt_wav(0.2), "hi", "k", CountingEncoder())
    with pytest.raises(AudioError):
        library.create("long", prompt_wav(3.0), "hi", "k", CountingEncoder(), max_seconds=2.0)
    with pytest.raises(AudioError):
        library.create("junk", b"this is not audio", "hi", "k", CountingEncoder())
    assert library.names() == ["bob"]
    assert sorted(os.listdir(tmp_path)) == ["bob"]  # failed creations leave nothing behind


def test_crash_mid_write_leaves_library_intact(tmp_path, monkeypatch):
    library = VoiceLibrary(tmp_path)
    library.create("keep", prompt_wav(1.0), "hi", "k", CountingEncoder())

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    # A failure at the moment the new voice would be renamed into place: no half voice appears.
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        library.create("new", prompt_wav(1.0), "hi", "k", CountingEncoder())
    monkeypatch.undo()
    assert library.names() == ["keep"]
    # Leftovers of a process killed mid-write (a temp voice, a half-deleted voice, a temp feature
    # file) are ignored by listing and cleaned up when the library opens next time.
    (tmp_path / ".tmp-dead").mkdir()
    (tmp_path / ".tmp-dead" / "voice.json").write_text("{")
    (tmp_path / ".trash-dead").mkdir()
    assert library.names() == ["keep"]
    VoiceLibrary(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep"]


def test_damaged_features_are_recomputed(tmp_path):
    encode = CountingEncoder()
    library = VoiceLibrary(tmp_path)
    library.create("eve", prompt_wav(1.0), "Hi", "k", encode)
    (tmp_path / "eve" / "features" / "k.pt").write_bytes(b"garbage")
    features = VoiceLibrary(tmp_path).features("eve", "k", encode)
    assert encode.calls == 2 and features.prompt_text == "hi"
    torch.load(tmp_path / "eve" / "features" / "k.pt", weights_only=True)  # rewritten, valid


def test_unreadable_voice_is_skipped(tmp_path):
    library = VoiceLibrary(tmp_path)
    library.create("ok", prompt_wav(1.0), "", "k", CountingEncoder())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "voice.json").write_text("not json")
    assert library.names() == ["ok"]


# ---------------------------------------------------------------------------------- streaming


def test_stream_resampler_equals_offline():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(22050) * 0.1).astype(np.float32)
    for sizes in ([22050], [1, 2, 3, 5000, 17044], [147] * 20 + [19110]):
        r = StreamResampler(22050, 24000)
        parts, start = [], 0
        for size in sizes:
            parts.append(r.feed(x[start : start + size]))
            start += size
        parts.append(r.finish())
        out = np.concatenate(parts)
        ref = resample(torch.from_numpy(x[:start]), 22050, 24000).numpy()
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-6


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "ogg"])
def test_streamed_files_decode(fmt):
    x = (np.sin(np.arange(22050) * 0.05) * 0.3).astype(np.float32)
    encoder = Encoder(fmt, 22050)
    data = b"".join([encoder.feed(piece) for piece in np.array_split(x, 7)] + [encoder.finish()])
    audio, rate = decode(data)
    assert rate == (48000 if fmt == "opus" else 22050)
    expected = len(x) * rate // 22050
    assert abs(len(audio) - expected) < 0.15 * expected  # codecs add their own padding


@pytest.mark.parametrize("rate", [22050, 24000, 48000])
def test_a_streamed_mp3_starts_with_audio_not_an_empty_frame(rate):
    """LAME's first frame holds the Info tag, written by a seek back at the end, which a stream
    cannot take: it went out empty, and decoders played it as silence before the audio."""
    x = np.zeros(rate, np.float32)
    x[rate // 2 : rate // 2 + 200] = 0.8  # a click half a second in
    encoder = Encoder("mp3", rate)
    data = b"".join([encoder.feed(piece) for piece in np.array_split(x, 9)] + [encoder.finish()])
    assert any(data[4:40])  # the first frame carries audio data
    audio, _ = decode(data)
    onset = int(np.argmax(np.abs(audio) > 0.3))
    # late by the codec's own delay only (576 + 529 samples; the Info tag's frame made it 1681)
    assert 0 <= onset - rate // 2 <= 1105 + 20, onset - rate // 2


def test_pcm_stream_and_whole_file():
    x = (np.sin(np.arange(1000) * 0.05) * 0.3).astype(np.float32)
    encoder = Encoder("pcm", 22050)
    data = b"".join([encoder.feed(x[:333]), encoder.feed(x[333:]), encoder.finish()])
    assert np.abs(np.frombuffer(data, "<i2") / 32767 - x).max() < 1e-4
    wav = Encoder("wav", 22050)
    head = wav.feed(x)
    assert head[:4] == b"RIFF" and head[40:44] == b"\xff\xff\xff\xff"
    whole = WholeEncoder("wav", 22050, 24000)
    whole.feed(x)
    audio, rate = decode(whole.finish())
    assert rate == 24000 and len(audio) == int(np.ceil(1000 * 24000 / 22050))
    assert wav_header(16000, 0)[40:44] == b"\x00\x00\x00\x00"


# ---------------------------------------------------------------------------------- metrics


def test_metrics_text_format():
    metrics = Metrics()
    metrics.request("POST", "/tts", 200)
    metrics.request("POST", "/tts", 200)
    metrics.error("voice_not_found")
    metrics.synthesis(2.0, 1.0)
    metrics.first_audio_latency(0.25)
    metrics.gauge("queue_depth", "waiting", lambda: 3)
    metrics.info = {"name": 'odd "name"'}
    text = metrics.render()
    assert metric(text, "cosyvoice_requests_total", endpoint="/tts", status="200") == 2
    assert metric(text, "cosyvoice_errors_total", code="voice_not_found") == 1
    assert metric(text, "cosyvoice_real_time_factor_bucket", le="0.5") == 1
    assert metric(text, "cosyvoice_real_time_factor_bucket", le="0.3") == 0
    assert metric(text, "cosyvoice_first_audio_seconds_count") == 1
    assert metric(text, "cosyvoice_queue_depth") == 3
    assert 'cosyvoice_model_info{name="odd \\"name\\""} 1' in text
    for line in text.splitlines():  # every sample line is "name{labels} value"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_unknown_voice_names_a_few_voices_not_all():
    from cosyvoice_lite.serving.voices import NAMES_SHOWN, unknown_voice

    few = str(unknown_voice("nobody", ["a", "b"]))
    assert few == "unknown voice 'nobody'; available: a, b"
    many = str(unknown_voice("nobody", [f"v{i}" for i in range(5000)]))
    assert f"v{NAMES_SHOWN - 1} and" in many and f"v{NAMES_SHOWN}," not in many
    assert "4980 more (GET /speakers" in many and len(many) < 400


def test_samples_are_written_in_full():
    """``:g`` kept 6 digits: a counter past a million moved in steps of 10 (rate() read 0)."""
    from cosyvoice_lite.serving.metrics import sample

    assert sample(1_234_567.0) == "1234567" and sample(1_234_571) == "1234571"
    assert sample(2_000_000.25) == "2000000.25" and sample(0.1) == "0.1"
    assert (sample(float("nan")), sample(float("inf"))) == ("NaN", "+Inf")
    metrics = Metrics()
    for _ in range(3):
        metrics.count("rejected_total")
    metrics.counters["rejected_total"] += 1_000_000
    assert "cosyvoice_rejected_total 1000003" in metrics.render()


def test_json_log_lines_carry_no_terminal_colours():
    """uvicorn's records repeat their message with ANSI colours (color_message)."""
    import logging

    from cosyvoice_lite.serving.logs import JsonFormatter

    record = logging.makeLogRecord(
        {"msg": "Started server process [%d]", "args": (7,), "color_message": "\x1b[36m%d\x1b[0m"}
    )
    line = JsonFormatter().format(record)
    assert "color_message" not in line and "\\u001b" not in line and "[7]" in line


def test_a_failed_save_still_degrades_the_storages_health(tmp_path):
    """The quota's pass-through took every StorageError: a store's own failure (S3 AccessDenied
    on PutObject) no longer showed in health(), /ready or the storage gauge."""
    from cosyvoice_lite.serving.voices import LocalVoiceStore, StorageError

    class FailingStore(LocalVoiceStore):
        def commit(self, staged):
            raise StorageError("the voice storage (S3) is unavailable (AccessDenied)", 503)

    library = VoiceLibrary(FailingStore(tmp_path))
    with pytest.raises(StorageError) as failed:
        library.create("alice", prompt_wav(1.5), "hello", "k", CountingEncoder())
    assert failed.value.status == 503 and "AccessDenied" in (library.health() or "")
    full = VoiceLibrary(tmp_path / "full", max_voices=1)
    full.create("bob", prompt_wav(1.5), "hello", "k", CountingEncoder())
    with pytest.raises(StorageError, match="--max-voices") as refused:
        full.create("carol", prompt_wav(1.5), "hello", "k", CountingEncoder())
    assert refused.value.status == 507 and full.health() is None  # full, not failing


def test_routes_are_named_by_their_templates(tmp_path):
    """Metrics and the quiet log name a route's template, never the path a client made up."""
    from cosyvoice_lite.serving import Settings, create_app
    from cosyvoice_lite.serving.app import _route_path

    app = create_app(lambda: None, Settings(voices_dir=tmp_path))  # (a loader: not run here)

    def named(method: str, path: str, root: str = "") -> str:
        scope = {"type": "http", "method": method, "path": root + path, "root_path": root,
                 "headers": [], "query_string": b""}  # fmt: skip
        return _route_path(app, scope)

    assert named("GET", "/v1/models/made-up") == "/v1/models/{model}"
    assert named("DELETE", "/v1/audio/voices/x") == "/v1/audio/voices/{name}"
    assert named("HEAD", "/health") == "/health" and named("GET", "/nowhere") == "unmatched"
    assert named("GET", "/voices/a/audio", "/tts") == "/voices/{name}/audio"
    assert named("GET", "", "/tts") == "/"  # the prefix without its slash (redirected)


def test_a_logged_path_cannot_write_lines_of_its_own():
    """uvicorn percent-decodes the path: a %0a in it had written a forged access-log line (and
    %1b terminal escapes) into the text log."""
    from cosyvoice_lite.serving.app import printable

    assert printable("/x\n2026-12-07 INFO forged\x1b[31m") == (
        "/x\\x0a2026-12-07 INFO forged\\x1b[31m"
    )
    assert printable("/voices/中文女") == "/voices/中文女"


def test_an_api_key_a_client_cannot_send_is_refused_at_start():
    """A header carries the key: a non-ASCII one was accepted at start and then never matched
    what curl or an SDK sends (UTF-8)."""
    from cosyvoice_lite.serving.settings import Settings

    for key in ("clé-secrète", "   ", "tab\there"):
        with pytest.raises(ValueError, match="printable ASCII"):
            Settings(api_key=key)
    assert Settings(api_key="s3cret-Key_1").api_key == "s3cret-Key_1"
    # a request's token is read stripped: "abc " refused every request, its own key included
    for key in ("abc ", " abc"):
        with pytest.raises(ValueError, match="space"):
            Settings(api_key=key)


def test_a_job_past_its_deadline_stops_while_its_reader_is_busy():
    """A client reading slowly (the handler waiting in a send) had the engine compute the whole
    request past the time limit: the work stops at the deadline, and the reader's next read is
    the timeout."""

    async def main() -> None:
        job = Job(asyncio.get_running_loop(), time.monotonic() + 0.3, held_until_read=True)
        stopped = threading.Event()
        job.on_cancel(stopped.set)

        def produce() -> None:
            while not job.cancelled.is_set():
                job.put(b"piece")
                time.sleep(0.01)
            job.finish()

        job.stop_at_deadline()
        threading.Thread(target=produce, daemon=True).start()
        assert await job.next() == b"piece"
        await asyncio.sleep(0.6)  # the reader is busy: nothing asks for a piece meanwhile
        assert stopped.is_set()
        with pytest.raises(JobTimeout):
            await job.next()

    asyncio.run(main())


def test_output_made_in_time_is_read_to_its_end_after_the_deadline():
    async def main() -> None:
        job = Job(asyncio.get_running_loop(), time.monotonic() + 0.2, held_until_read=True)
        job.stop_at_deadline()
        for piece in (b"a", b"b"):
            job.put(piece)
        job.finish()
        await asyncio.sleep(0.4)
        assert [piece async for piece in job] == [b"a", b"b"]
        assert not job.timed_out

    asyncio.run(main())
