"""Whole-file checks of a model directory: what loading does not look at.

Loading maps checkpoints into memory and trusts their bytes (torch does not check the zip
archive's CRC-32s), so a bit flipped on disk or in transfer loads as a wrong weight and the
model speaks noise without an error. ``check_model_files`` reads every byte of the files the
engine opens once: each checkpoint's members against their CRC-32s, and each file a Hugging Face
download recorded against the hash the hub gave for it (sha256 for large files, the git blob id
for small ones; the hub cache's ``blobs/`` files are named by it). About a second per 1-2 GB.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .modeldir import detect_version, required_files

# optional files the engine reads when they are there
OPTIONAL_READ = ("spk2info.pt", "llm.rl.pt")
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
    """Every file the engine reads in ``model_dir``, read whole and checked (see the module)."""
    version = detect_version(model_dir)
    names = [*required_files(version)]
    names += [name for name in OPTIONAL_READ if (model_dir / name).exists()]
    return [check_file(model_dir, name) for name in names]


def check_file(model_dir: Path, name: str) -> FileCheck:
    path = model_dir / name
    if not path.is_file():
        return FileCheck(name, (), "missing or not a file")
    checked: list[str] = []
    try:
        if name.endswith(".pt"):
            checked.append("crc32")
            if problem := _archive_problem(path):
                return FileCheck(name, tuple(checked), problem)
        if (recorded := recorded_hash(model_dir, name)) is not None:
            kind, digest = _digest(path, recorded)
            checked.append(kind)
            if digest != recorded:
                return FileCheck(
                    name,
                    tuple(checked),
                    f"differs from the file the hub gave ({kind} {digest[:12]}..., "
                    f"recorded {recorded[:12]}...)",
                )
    except OSError as exc:
        return FileCheck(name, tuple(checked), f"unreadable ({exc.strerror or exc})")
    return FileCheck(name, tuple(checked))


def _archive_problem(path: Path) -> str | None:
    """A torch checkpoint's members read against their CRC-32s. torch.save stores members
    uncompressed, so reading one costs its size on disk: a compressed member (a zip bomb's
    way to cost far more than its size) is refused unread."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.compress_type != zipfile.ZIP_STORED:
                    return f"member {member.filename} is compressed: not written by torch.save"
                with archive.open(member) as stream:
                    while stream.read(BLOCK):
                        pass
    except zipfile.BadZipFile as exc:
        return f"damaged ({exc})"
    except (EOFError, ValueError) as exc:  # a member that ends before its recorded size
        return f"damaged (truncated: {exc})"
    return None


def recorded_hash(model_dir: Path, name: str) -> str | None:
    """The hash the hub gave for ``name``: a ``local_dir`` download's metadata (commit, etag,
    time), or the name of the hub cache's blob that the file links to; None when neither."""
    metadata = model_dir / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    try:
        lines = metadata.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    if len(lines) >= 2 and _HEX.fullmatch(lines[1].strip()):
        return lines[1].strip()
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
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return kind, digest.hexdigest()
