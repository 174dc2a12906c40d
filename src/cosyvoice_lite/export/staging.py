"""Hidden work directories that appear whole or not at all: an export's staging (and the output it
replaces, set aside), the int8 copies' work directories; their locks and their leftovers.

Liveness is proven by a lock (``fcntl.flock``), never by a process id: in a container the export
is PID 1 on every run, and a process of another PID namespace is not seen. A leftover is removed
only when no one holds its lock and nothing in it changed for ``LEFTOVER_AGE_SECONDS`` (the age
covers file systems whose flock does not reach the other writers, and the instant between
making a directory and locking it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

LEFTOVER_AGE_SECONDS = 600  # untouched this long (a live export writes graph after graph)
NAME_MAX_BYTES = 255  # a file name's limit on every common file system
# what a hidden name adds to its stem: ".", ".partial-", a pid (7 digits), "-", 8 hex
HIDDEN_NAME_BYTES = 1 + 9 + 7 + 1 + 8
# staging, an output set aside while it is replaced (probe: the check of older versions)
_HIDDEN = re.compile(r"\.(.+)\.(?:partial|old|probe)-\d+-[0-9a-f]{8}")
_OUTPUT_LOCK = re.compile(r"\.(.+)\.export-lock")


class Held(Exception):
    """A lock someone else holds (their process id is written in it)."""


# ------------------------------------------------------------------------------------ names


def hidden_stem(out_dir: Path, parent: Path) -> str:
    """The stem of the hidden names of an export to ``out_dir`` staged in ``parent``: the
    output's name, shortened with a hash where the hidden names would pass the file system's
    255 bytes (or where the output is deeper in ``parent``: two such outputs differ)."""
    label = (
        out_dir.name if parent in (out_dir, out_dir.parent) else str(out_dir.relative_to(parent))
    )
    if "/" not in label and len(label.encode()) <= NAME_MAX_BYTES - HIDDEN_NAME_BYTES:
        return label
    digest = hashlib.sha256(label.encode()).hexdigest()[:8]
    return out_dir.name.encode()[:64].decode(errors="ignore") + "~" + digest


def new_hidden(directory: Path, stem: str, kind: str) -> Path:
    """A name no one holds in ``directory`` (hidden; the process id and a random part)."""
    while True:
        candidate = directory / f".{stem}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        if not candidate.exists():
            return candidate


def output_lock_path(directory: Path, stem: str) -> Path:
    return directory / f".{stem}.export-lock"


def ours(name: str) -> bool:
    """A hidden entry an export makes (staging, a set-aside output, an output lock)."""
    return bool(_HIDDEN.fullmatch(name) or _OUTPUT_LOCK.fullmatch(name))


def staging_parent(out_dir: Path) -> Path:
    """Where an export to ``out_dir`` is staged and locked: in it when it holds nothing but
    exports' hidden entries (a mounted volume, the current directory), beside it when it has
    files (replaced with --force), else in its nearest existing ancestor. (Hidden entries do
    not count: a second export to an empty volume finds the first one's lock there.)"""
    if out_dir.is_dir():
        empty = all(ours(p.name) for p in out_dir.iterdir())
        return out_dir if empty else out_dir.parent
    return next(p for p in out_dir.parents if p.is_dir())


# ------------------------------------------------------------------------------------ locks


def try_lock(path: Path) -> int:
    """An exclusive flock on ``path`` (made if missing), with this process's id written in it:
    the open descriptor, or ``Held``. The file is the one at ``path`` when taken (a holder that
    removed it on release leaves a lock on a file no one else finds)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Held(str(path)) from None
        if _is_at(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # removed (or replaced) meanwhile: take the one there now


def release(fd: int, path: Path) -> None:
    """Remove the lock file, then let go of it (in that order: no one takes a removed one)."""
    path.unlink(missing_ok=True)
    os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def is_held(path: Path) -> bool:
    """Whether a live process holds the flock on ``path`` (False where it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:  # (not ours to read: take it for held)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ------------------------------------------------------------------------------------ leftovers


def recent(entry: Path) -> bool:
    """Whether ``entry`` or anything directly in it changed within LEFTOVER_AGE_SECONDS."""
    try:
        paths = [entry, *entry.iterdir()] if entry.is_dir() and not entry.is_symlink() else [entry]
        newest = max(path.lstat().st_mtime for path in paths)
    except FileNotFoundError:  # (removed meanwhile by its owner)
        return True
    return time.time() - newest < LEFTOVER_AGE_SECONDS


def remove(entry: Path) -> None:
    log.warning("removing %s, left by a process that was stopped", entry)
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def remove_dead_exports(directory: Path) -> None:
    """An export's hidden entries left by one killed outright (SIGKILL, the OOM killer):
    gigabytes for a real model, and an output that looked empty was refused. Each is alive while
    the export lock of its stem beside it is held (its exporter holds it for the whole export)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if (match := _HIDDEN.fullmatch(entry.name)) is not None:
            lock = output_lock_path(directory, match.group(1))
            if not is_held(lock) and not recent(entry):
                remove(entry)
    for entry in directory.iterdir():  # then the locks themselves, taken before removal
        if _OUTPUT_LOCK.fullmatch(entry.name) and not recent(entry):
            _remove_stale_lock(entry)


def _remove_stale_lock(path: Path) -> None:
    try:
        fd = try_lock(path)
    except (Held, OSError):
        return
    log.warning("removing %s, left by an export that was stopped", path)
    release(fd, path)


def remove_dead_work_dirs(directory: Path, pattern: re.Pattern[str], lock_name: str) -> None:
    """Work directories matching ``pattern`` whose lock file inside (``lock_name``) no one holds
    and that have not changed for LEFTOVER_AGE_SECONDS (int8 copies' work directories)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if pattern.fullmatch(entry.name) and not is_held(entry / lock_name) and not recent(entry):
            remove(entry)


# ------------------------------------------------------------------------------------ replace


class Appeared(Exception):
    """Something took the output's place while the export ran (it is left as it is)."""


def replace(out_dir: Path, staging: Path, stem: str, force: bool) -> None:
    """The finished export takes the output's place. Without ``force`` nothing is ever replaced:
    staging is renamed onto the output at once (which fails where something appeared there
    meanwhile, ``Appeared``). With it, a directory with files is moved aside first and deleted
    only once the new one is in place."""
    if staging.parent == out_dir:  # it was empty (the current directory: it stays that one)
        _move_into(out_dir, staging, force)
    elif force and out_dir.exists():
        _swap(out_dir, staging, stem)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)  # (a failed export leaves none)
        try:  # (a rename onto a directory with files fails; onto an empty one replaces nothing)
            staging.rename(out_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise Appeared(f"{out_dir} appeared while the export ran") from None


def _move_into(out_dir: Path, staging: Path, force: bool) -> None:
    if not force and any(not ours(p.name) for p in out_dir.iterdir()):
        raise Appeared(f"files appeared in {out_dir} while the export ran")
    for path in staging.iterdir():
        path.rename(out_dir / path.name)
    staging.rmdir()


def _swap(out_dir: Path, staging: Path, stem: str) -> None:
    old = new_hidden(out_dir.parent, stem, "old")
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # put it back
        raise
    shutil.rmtree(old, ignore_errors=True)
