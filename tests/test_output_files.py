"""Output files (files.py) and their two writers: `say`'s AudioOutput, each run writing a file of
its own that no other run or planted symlink shares, and synthesize_to_file, whose path is
checked before the synthesis and whose atomic write goes through symlinks and keeps a file's
permissions. No model is loaded here."""

from __future__ import annotations

import os
import stat
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosyvoice_lite import InvalidRequestError, Mode, SynthesisRequest, synthesize_to_file
from cosyvoice_lite.cli import AudioOutput
from cosyvoice_lite.files import create_temporary, write_atomic

RATE = 16000


def _level(value: float) -> np.ndarray:
    return np.full(1000, value, np.float32)


def _written(path: Path) -> np.ndarray:
    samples, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE
    return samples


def test_say_runs_into_one_output_each_replace_it_whole(tmp_path: Path) -> None:
    """Two `say -o out.wav` wrote one fixed .out.wav.partial: the run that finished first
    renamed the other's half-written file into place, the other then failed with a raw
    FileNotFoundError, and the file mixed both."""
    out = tmp_path / "out.wav"
    first, second = (AudioOutput(str(out), "wav", False, RATE) for _ in range(2))
    first.write(_level(0.25))
    second.write(_level(-0.5))
    second.finish()
    assert np.allclose(_written(out), -0.5, atol=1e-4)
    first.write(_level(0.25))
    first.finish()  # the last one wins, whole
    assert np.allclose(_written(out), 0.25, atol=1e-4) and len(_written(out)) == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_a_failed_say_removes_only_its_own_file(tmp_path: Path) -> None:
    """The abort of one run removed the partial file another run was writing."""
    out = tmp_path / "out.wav"
    failed, other = (AudioOutput(str(out), "wav", False, RATE) for _ in range(2))
    failed.write(_level(0.25))
    other.write(_level(-0.5))
    failed.abort()
    other.finish()
    assert np.allclose(_written(out), -0.5, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]


def test_say_never_writes_through_a_planted_partial_symlink(tmp_path: Path) -> None:
    """Anyone who can write the output's folder could plant .out.wav.partial -> any file of the
    user running `say`, and `say` overwrote that file."""
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    (tmp_path / ".out.wav.partial").symlink_to(notes)
    output = AudioOutput(str(tmp_path / "out.wav"), "wav", False, RATE)
    output.write(_level(0.25))
    output.finish()
    assert notes.read_text() == "precious"
    assert np.allclose(_written(tmp_path / "out.wav"), 0.25, atol=1e-4)


def test_a_temporary_name_taken_is_never_opened(tmp_path: Path, monkeypatch) -> None:
    """The temporary file is created new (O_EXCL, O_NOFOLLOW): a name already there, a
    symlink above all, is an error, never written through."""
    fixed = uuid.UUID(int=7)
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    (tmp_path / f".out.wav.{fixed.hex}.partial").symlink_to(notes)
    with pytest.raises(FileExistsError):
        create_temporary(tmp_path / "out.wav")
    assert notes.read_text() == "precious"


def test_write_atomic_keeps_permissions_and_goes_through_symlinks(tmp_path: Path) -> None:
    """A private file (0600) came back world-readable (0644), and a symlinked output was replaced
    by a regular file instead of its target being written."""
    private = tmp_path / "private.wav"
    private.write_bytes(b"old")
    private.chmod(0o600)
    write_atomic(private, b"new")
    assert private.read_bytes() == b"new" and stat.S_IMODE(private.stat().st_mode) == 0o600
    target, link = tmp_path / "target.wav", tmp_path / "link.wav"
    target.write_bytes(b"old")
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.wav", "private.wav", "target.wav"]


def test_write_atomic_takes_names_at_the_file_systems_limit(tmp_path: Path) -> None:
    """A valid 240-byte name failed: its temporary name passed 255 bytes (ENAMETOOLONG)."""
    long_name = tmp_path / ("b" * 236 + ".wav")
    write_atomic(long_name, b"data")
    assert long_name.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [long_name.name]


def test_write_atomic_writes_a_fifo_in_place(tmp_path: Path) -> None:
    """A FIFO (or a device: /dev/null, as root) was replaced by a regular file."""
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_atomic(fifo, b"data")
    reader.join(timeout=30)
    assert received == [b"data"] and stat.S_ISFIFO(fifo.lstat().st_mode)


class _NoSynthesis:
    """An engine that must not be reached: the checks come first."""

    sample_rate = RATE

    def synthesize(self, request, progress=None):  # noqa: ANN001, ANN201
        raise AssertionError("synthesized before the output was checked")


def test_synthesize_to_file_checks_the_output_before_the_synthesis(tmp_path: Path) -> None:
    """A directory named x.wav, a place that takes no files and an unwritable folder were
    found after the whole synthesis, as raw OSErrors."""
    request = SynthesisRequest(Mode.PRESET, "你好。", voice="中文女")
    (tmp_path / "isdir.wav").mkdir()
    bad = [tmp_path / "isdir.wav", tmp_path / "missing" / "x.wav"]
    if Path("/sys/kernel").is_dir():
        bad.append(Path("/sys/kernel/x.wav"))
    (tmp_path / "loop.wav").symlink_to("loop.wav")  # (the write failed on it after the work)
    bad.append(tmp_path / "loop.wav")
    for path in bad:
        with pytest.raises(InvalidRequestError, match="cannot write|is a directory|a loop"):
            synthesize_to_file(_NoSynthesis(), request, path)


def test_synthesize_to_file_refuses_what_is_not_a_request(tmp_path: Path) -> None:
    """A text where the request goes failed inside the engine with an AttributeError."""
    for wrong in ("你好。", {"mode": "preset", "text": "你好。"}):
        with pytest.raises(InvalidRequestError, match="must be a SynthesisRequest"):
            synthesize_to_file(_NoSynthesis(), wrong, tmp_path / "x.wav")
