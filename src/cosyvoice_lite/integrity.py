"""Whole-file checks of a model directory: what loading does not look at.

Loading maps checkpoints into memory and trusts their bytes (torch does not check the zip
archive's CRC-32s), so a bit flipped on disk or in transfer loads as a wrong weight and the
model speaks noise without an error. ``check_model_files`` reads every byte of the files the
engine opens once: each file a Hugging Face download recorded against the hash the hub gave for
it (sha256 for large files, the git blob id for small ones; the hub cache's ``blobs/`` files are
named by it), and other checkpoints' members against their CRC-32s. About a second per 1-2 GB.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .hub import file_digest
from .modeldir import detect_version, required_files

BLOCK = 1 << 20
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclass(frozen=True)
class FileCheck:
    """One file's result: ``problem`` is None when it is intact; ``checked`` names what was
    compared (``"crc32"``, ``"sha256"``, ``"git-sha1"``; empty: nothing to compare with)."""

    name: str
    checked: tuple[str, ...]
    problem: str | None = None


def check_model_files(model_dir: Path) -> list[FileCheck]:
    """Every file the engine reads in ``model_dir``, read whole and checked (see the module);
    every checkpoint there too (a fine-tuned LLM that ``llm_checkpoint=`` names)."""
    version = detect_version(model_dir)
    names = [*required_files(version)]
    names += sorted(path.name for path in model_dir.glob("*.pt") if path.name not in names)
    return [check_file(model_dir, name) for name in names]


def check_file(model_dir: Path, name: str) -> FileCheck:
    """A file against the hub's hash where one is recorded (then it is the hub's file, whatever
    else), else a checkpoint against its CRC-32s."""
    path = model_dir / name
    if not path.is_file():
        return FileCheck(name, (), "missing or not a file")
    try:
        if (recorded := recorded_hash(model_dir, name)) is not None:
            kind, digest = _digest(path, recorded)
            if digest != recorded:
                problem = (
                    f"differs from the file the hub gave ({kind} {digest[:12]}..., "
                    f"recorded {recorded[:12]}...)"
                )
                return FileCheck(name, (kind,), problem)
            return FileCheck(name, (kind,))
        if name.endswith(".pt"):
            crc, problem = _archive_check(path)
            return FileCheck(name, ("crc32",) if crc or problem else (), problem)
    except OSError as exc:
        return FileCheck(name, (), f"unreadable ({exc.strerror or exc})")
    return FileCheck(name, ())


def _archive_check(path: Path) -> tuple[bool, str | None]:
    """A torch checkpoint's members read against their CRC-32s: (whether any CRC was there to
    compare, the problem). torch.save stores members uncompressed, each once, so reading them
    costs the file's size: compressed or overlapping members (a zip bomb's ways to cost far
    more) are refused unread. A legacy (pickled, not zip) checkpoint and an archive saved
    without CRC-32s (``torch.serialization.set_crc32_options(False)``) load, and have none."""
    with path.open("rb") as handle:
        if handle.read(2) != b"PK":
            return False, None  # (not a zip: a legacy file; torch.load says if it is none)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if problem := _unbounded(members, path.stat().st_size):
                return False, problem
            checked = [m for m in members if m.CRC != 0 or m.file_size == 0]
            for member in checked:
                with archive.open(member) as stream:
                    while stream.read(BLOCK):
                        pass
    except zipfile.BadZipFile as exc:
        return False, f"damaged ({exc})"
    except (EOFError, ValueError) as exc:  # a member that ends before its recorded size
        return False, f"damaged (truncated: {exc})"
    return bool(checked), None


def _unbounded(members: list[zipfile.ZipInfo], size: int) -> str | None:
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            return f"member {member.filename} is compressed: not written by torch.save"
    if sum(member.file_size for member in members) > size:
        return (
            "its members overlap (more bytes listed than the file has): not written by torch.save"
        )
    return None


def recorded_hash(model_dir: Path, name: str) -> str | None:
    """The hash the hub gave for ``name``: a ``local_dir`` download's metadata (commit, etag,
    time), or the name of the hub cache's blob that the file links to; None when neither."""
    metadata = model_dir / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    try:
        lines = metadata.read_text(encoding="ascii").splitlines()
        recorded, when = lines[1].strip(), float(lines[2])
        # huggingface_hub's own rule: a file changed after its record (fine-tuned weights put
        # in its place) is no longer the hub's, and its record says nothing of it
        if _HEX.fullmatch(recorded) and (model_dir / name).stat().st_mtime - 1 <= when:
            return recorded
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        pass
    path = model_dir / name
    if path.is_symlink():
        blob = path.resolve()
        if blob.parent.name == "blobs" and _HEX.fullmatch(blob.name):
            return blob.name
    return None


def _digest(path: Path, recorded: str) -> tuple[str, str]:
    """sha256 for a large (LFS) file's 64 hex digits; else git's blob id, 40 hex digits
    (sha1 over ``blob <size>\\0`` and the bytes)."""
    if len(recorded) == 64:
        digest, kind = hashlib.sha256(), "sha256"
    else:
        digest, kind = hashlib.sha1(usedforsecurity=False), "git-sha1"
        digest.update(f"blob {path.stat().st_size}\0".encode())
    return kind, file_digest(path, digest)
