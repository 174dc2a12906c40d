"""Output files: audio formats by extension, the check of an output path, and writes that appear
whole or not at all. Light (no torch at import): the CLI's option checks use it before anything
loads."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

from .errors import InvalidRequestError

EXTENSIONS = {".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".ogg": "ogg", ".opus": "opus"}
"""The audio format an output file's extension names."""

# a file of this writer's own: never one another run made, never through a planted symlink
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_CREATE_NEW |= getattr(os, "O_CLOEXEC", 0)  # (nor inherited by a child process)


def check_output_path(path: str | Path) -> Path:
    """``path`` (``~`` expanded) if a file can be written there, else an InvalidRequestError
    saying why: before the work, not found after it (the CLI's ``say``, ``synthesize_to_file``)."""
    try:
        return _checked_output(str(path))
    except OSError as exc:  # e.g. a name past the file system's limit
        raise InvalidRequestError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def _checked_output(path: str) -> Path:
    out = Path(path).expanduser()
    if out.is_dir():
        raise InvalidRequestError(f"output {path!r} is a directory; give a file name")
    # through a symlink, the file it points to (a dangling one's too) is what gets written
    if out.is_symlink():
        try:
            out.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidRequestError(
                    f"cannot write {path!r}: a loop of symbolic links"
                ) from None
    target = Path(os.path.realpath(out)) if out.is_symlink() else out
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidRequestError(
            f"cannot write {path!r}: directory {str(parent)!r} does not exist"
        )
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InvalidRequestError(f"cannot write {path!r}: permission denied")
    most = name_max(parent)
    if len(os.fsencode(target.name)) > most:  # (its bytes: a non-UTF-8 name is no str's)
        raise InvalidRequestError(
            f"cannot write {path!r}: its name is too long (at most {most} bytes here)"
        )
    if not is_special(out):  # (a FIFO or a device is written as it is)
        _probe(Path(os.path.realpath(out)), path)
    return out


def _probe(real: Path, path: str) -> None:
    """A file made beside ``real`` and removed now: a place that takes no files is found before
    the work (os.access lets root "write" where nothing can be: /sys)."""
    probe = real.with_name(f".cosyvoice-lite-probe-{uuid.uuid4().hex[:12]}")
    try:
        os.close(os.open(probe, _CREATE_NEW, 0o600))
        probe.unlink()
    except OSError as exc:
        raise InvalidRequestError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def not_utf8(path: str | os.PathLike) -> str | None:
    """``path`` as it can be shown (undecodable bytes as \\xNN) where it is not valid UTF-8 (a
    name made under another encoding, GBK say), else None: torch and libsndfile take paths as
    UTF-8 only, and failed on such names with errors that called the file corrupt."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # (Python holds the bytes it could not decode as surrogates)
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return None


def is_special(path: Path) -> bool:
    """A FIFO, a device or the like: written in place, never replaced nor removed."""
    return path.exists() and not path.is_file()


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes."""
    return os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255


def temporary_path(final: Path) -> Path:
    """A name of its own beside ``final`` for a write that is renamed to it: after it where that
    fits the file system's limit, else short. (It does not match "*.json" globs of readers
    waiting for a result.)"""
    name = f".{final.name}.{uuid.uuid4().hex}.partial"
    if len(os.fsencode(name)) > name_max(final.parent):
        name = f".cosyvoice-lite-{uuid.uuid4().hex}.partial"
    return final.with_name(name)


def create_temporary(final: Path) -> tuple[Path, int]:
    """A new file beside ``final`` for this writer alone, open for writing (its descriptor):
    created exclusively, and no more readable than the ``final`` it is to replace."""
    path = temporary_path(final)
    try:
        mode = stat.S_IMODE(final.stat().st_mode)
    except OSError:  # (not there yet: the usual mode, as the umask says)
        mode = 0o666
    return path, os.open(path, _CREATE_NEW, mode)


def keep_mode(final: Path, replacement: Path) -> None:
    """A file replaced keeps who may read it (a private recording stays private)."""
    with contextlib.suppress(FileNotFoundError):  # (none there, or gone meanwhile)
        shutil.copymode(final, replacement)


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` written beside ``path`` under a name of its own, then renamed over it: through a
    symlink, over the file it points to; an existing file's permissions kept. A FIFO or a device
    is written in place (never replaced by a regular file)."""
    final = Path(os.path.realpath(path))
    if is_special(final):
        with open(final, "wb") as sink:
            sink.write(data)
        return
    temporary, fd = create_temporary(final)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        keep_mode(final, temporary)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
