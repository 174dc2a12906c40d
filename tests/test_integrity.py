"""Whole-file checks of a model directory (``cosyvoice-lite check``, and after each download)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cosyvoice_lite.cli import main
from cosyvoice_lite.errors import ModelDownloadError
from cosyvoice_lite.hub import COMPLETE_MARK, download_model
from cosyvoice_lite.integrity import FileCheck, check_model_files

TINY = Path(__file__).resolve().parent / "data" / "models" / "v2-tiny"


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(TINY, tmp_path / "CosyVoice2-0.5B"))


def _flip_a_weight_bit(checkpoint: Path) -> None:
    """One bit of the largest tensor's bytes, as a failing disk or a bad transfer leaves it."""
    with zipfile.ZipFile(checkpoint) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
        with checkpoint.open("rb") as handle:  # the data starts after the member's local header
            handle.seek(member.header_offset + 26)
            name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in "ab")
        start = member.header_offset + 30 + name_length + extra_length
    data = bytearray(checkpoint.read_bytes())
    data[start + member.file_size // 2] ^= 0x04
    checkpoint.write_bytes(bytes(data))


def _record_as_hugging_face_does(model_dir: Path, name: str, etag: str) -> None:
    metadata = model_dir / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    metadata.parent.mkdir(parents=True, exist_ok=True)
    # (the time of the download: a file changed after it is no longer the hub's)
    metadata.write_text(f"{'c' * 40}\n{etag}\n{time.time() + 1}\n")


def test_a_flipped_weight_bit_loads_unnoticed_but_check_finds_it(model_copy: Path, capsys) -> None:
    assert main(["check", str(model_copy)]) == 0
    assert "intact" in capsys.readouterr().out
    before = torch.load(model_copy / "flow.pt", weights_only=True)
    _flip_a_weight_bit(model_copy / "flow.pt")
    after = torch.load(model_copy / "flow.pt", weights_only=True)  # torch reads it as it is
    assert sum(int((before[k] != after[k]).sum()) for k in before) == 1
    assert main(["check", str(model_copy)]) == 2
    captured = capsys.readouterr()
    assert "DAMAGED flow.pt (crc32)" in captured.out and "ok      llm.pt (crc32)" in captured.out
    assert "1 of" in captured.err and "flow.pt: damaged (Bad CRC-32" in captured.err


def test_files_are_checked_against_the_hubs_hashes(model_copy: Path, capsys) -> None:
    """A local_dir download's records: sha256 for large (LFS) files, the git blob id for small
    ones (git computes it here, independently of ours)."""
    onnx = model_copy / "campplus.onnx"
    _record_as_hugging_face_does(
        model_copy, "campplus.onnx", hashlib.sha256(onnx.read_bytes()).hexdigest()
    )
    config = "CosyVoice-BlankEN/config.json"
    blob_id = subprocess.run(
        ["git", "hash-object", str(model_copy / config)], capture_output=True, text=True, check=True
    ).stdout.strip()
    _record_as_hugging_face_does(model_copy, config, blob_id)
    results = {result.name: result for result in check_model_files(model_copy)}
    assert (
        results["campplus.onnx"].checked == ("sha256",) and results["campplus.onnx"].problem is None
    )
    assert results[config].checked == ("git-sha1",) and results[config].problem is None
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 1
    onnx.write_bytes(bytes(data))
    (model_copy / config).write_text((model_copy / config).read_text() + " ")
    assert main(["check", str(model_copy)]) == 2
    err = capsys.readouterr().err
    assert "2 of" in err and "campplus.onnx: differs from the file the hub gave (sha256" in err
    assert f"{config}: differs from the file the hub gave (git-sha1" in err


def test_a_hub_cache_snapshot_is_checked_against_its_blob_names(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--FunAudioLLM--CosyVoice2-0.5B" / "snapshots" / "abc"
    blobs = tmp_path / "models--FunAudioLLM--CosyVoice2-0.5B" / "blobs"
    shutil.copytree(TINY, snapshot)
    blobs.mkdir()
    llm = snapshot / "llm.pt"
    blob = blobs / hashlib.sha256(llm.read_bytes()).hexdigest()
    shutil.move(llm, blob)
    llm.symlink_to(Path("..", "..", "blobs", blob.name))
    results = {result.name: result for result in check_model_files(snapshot)}
    assert results["llm.pt"].checked == ("sha256",) and results["llm.pt"].problem is None
    shutil.move(blob, blobs / ("0" * 64))  # the blob another revision had: a different file
    llm.unlink()
    llm.symlink_to(Path("..", "..", "blobs", "0" * 64))
    results = {result.name: result for result in check_model_files(snapshot)}
    assert "differs from the file the hub gave" in results["llm.pt"].problem


def test_a_compressed_member_is_refused_unread(model_copy: Path) -> None:
    """torch.save stores members uncompressed; reading a compressed one could cost far more than
    the file's size (a zip bomb), so it is refused before being read."""
    bomb = model_copy / "hift.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", b"\0" * (1 << 20))
    problem = next(r.problem for r in check_model_files(model_copy) if r.name == "hift.pt")
    assert problem == "member archive/data/0 is compressed: not written by torch.save"


def test_a_download_damaged_in_transfer_is_fetched_again(tmp_path: Path) -> None:
    """A file that does not hash as the hub recorded it is removed with its record (so the
    hub client fetches it again), and the download is not marked whole."""
    target = tmp_path / "CosyVoice2-0.5B"

    def fetches_a_damaged_file(repo: str, into: Path) -> None:
        shutil.copytree(TINY, into, dirs_exist_ok=True)
        _record_as_hugging_face_does(into, "llm.pt", "f" * 64)

    def fetches_all(repo: str, into: Path) -> None:
        shutil.copytree(TINY, into, dirs_exist_ok=True)
        llm = into / "llm.pt"
        _record_as_hugging_face_does(into, "llm.pt", hashlib.sha256(llm.read_bytes()).hexdigest())

    with pytest.raises(ModelDownloadError, match=r"llm.pt differs from the file the hub gave"):
        download_model("CosyVoice2-0.5B", target, [("A", "x", fetches_a_damaged_file)])
    assert not (target / "llm.pt").exists() and not (target / COMPLETE_MARK).exists()
    assert not (target / ".cache" / "huggingface" / "download" / "llm.pt.metadata").exists()
    download_model("CosyVoice2-0.5B", target, [("A", "x", fetches_all)])
    assert (target / COMPLETE_MARK).is_file()


def test_checkpoints_without_crcs_load_and_are_not_damaged(model_copy: Path) -> None:
    """torch.load reads an archive saved without CRC-32s and a legacy (pickled) checkpoint:
    they were called damaged, and a download removed them, even when the hub's hash matched."""
    llm = model_copy / "llm.pt"
    state = torch.load(llm, weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, llm)
    finally:
        torch.serialization.set_crc32_options(True)
    speakers = model_copy / "spk2info.pt"
    torch.save(
        torch.load(speakers, weights_only=True), speakers, _use_new_zipfile_serialization=False
    )
    results = {result.name: result for result in check_model_files(model_copy)}
    assert results["llm.pt"] == FileCheck("llm.pt", ())
    assert results["spk2info.pt"] == FileCheck("spk2info.pt", ())
    assert results["flow.pt"] == FileCheck("flow.pt", ("crc32",))
    # with the hub's record of it, a file is the hub's file whatever its format
    _record_as_hugging_face_does(model_copy, "llm.pt", hashlib.sha256(llm.read_bytes()).hexdigest())
    assert {r.name: r for r in check_model_files(model_copy)}["llm.pt"].checked == ("sha256",)


def test_a_file_changed_after_its_download_is_checked_as_any_other(model_copy: Path) -> None:
    """A fine-tuned llm.pt put in place of the downloaded one was called damaged against the
    hub's old record (huggingface_hub itself ignores a record older than its file)."""
    _record_as_hugging_face_does(model_copy, "llm.pt", "f" * 64)
    llm = model_copy / "llm.pt"
    later = time.time() + 60
    os.utime(llm, (later, later))
    assert {r.name: r for r in check_model_files(model_copy)}["llm.pt"] == FileCheck(
        "llm.pt", ("crc32",)
    )


def test_every_checkpoint_in_the_directory_is_read(model_copy: Path) -> None:
    """The LLM a server loads with llm_checkpoint= (a fine-tuned one) is checked too."""
    shutil.copy(model_copy / "llm.pt", model_copy / "llm_finetuned.pt")
    _flip_a_weight_bit(model_copy / "llm_finetuned.pt")
    results = {result.name: result for result in check_model_files(model_copy)}
    assert "Bad CRC-32" in results["llm_finetuned.pt"].problem


def test_overlapping_members_are_refused_unread(model_copy: Path) -> None:
    """An archive listing one stored member many times read ~200x its size."""
    bomb = model_copy / "hift.pt"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("archive/data/0", b"\0" * (1 << 16))
    data = bomb.read_bytes()
    start = data.rindex(b"PK\x01\x02")  # the central directory: its one entry, then the end
    entry, end = (
        data[start : data.rindex(b"PK\x05\x06")],
        bytearray(data[data.rindex(b"PK\x05\x06") :]),
    )
    end[8:10] = end[10:12] = (200).to_bytes(2, "little")
    end[12:16] = (len(entry) * 200).to_bytes(4, "little")
    bomb.write_bytes(data[:start] + entry * 200 + bytes(end))
    assert len(zipfile.ZipFile(bomb).infolist()) == 200
    problem = {r.name: r for r in check_model_files(model_copy)}["hift.pt"].problem
    assert problem.startswith("its members overlap")


def test_check_names_a_model_not_downloaded(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COSYVOICE_LITE_CACHE", str(tmp_path))
    assert main(["check", "CosyVoice2-0.5B"]) == 2
    assert (
        "not downloaded: run cosyvoice-lite download CosyVoice2-0.5B first"
        in capsys.readouterr().err
    )
