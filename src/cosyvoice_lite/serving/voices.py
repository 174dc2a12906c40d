"""The persistent voice library: prompt recordings saved by name, with their features.

Layout of the library directory (one sub-directory per voice):

    <root>/<name>/voice.json          name, transcript, duration, sample rate, creation time
    <root>/<name>/prompt.wav          the decoded prompt (float32 WAV: the features are exactly
                                      reproducible from it)
    <root>/<name>/features/<key>.pt   prompt features for one model family (e.g. "v1-22050"):
                                      plain tensors + the normalised transcript, read back with
                                      ``torch.load(weights_only=True)``; recomputed from prompt.wav
                                      when another model family first uses the voice

Every write is atomic: a voice is assembled in ``.tmp-*`` and renamed into place, feature files
are written to a temporary name and ``os.replace``d, and deletion renames the voice away before
removing it. A crash therefore leaves either the old state or the new one, never half a voice.
Several processes may share the directory: each ``.tmp-*``/``.trash-*`` work folder is locked
(``flock`` of ``<folder>.lock``) while its process uses it, and those left by a process that
died are cleaned up when the library opens; a name's check and its write hold a lock on the
directory, so names stay unique without regard to case across the processes.

Where the files live is a :class:`VoiceStore`: :class:`LocalVoiceStore` (the directory above, the
default) or ``voice_store_s3.S3VoiceStore`` (a bucket shared by several server processes). The
library keeps the rules (names, checks, features) and uses the store only to stage a voice
invisibly, commit it atomically, read, replace one file, and remove a voice at once.

Names are normalised to Unicode NFKC and unique without regard to case (``Alice``, ``ALICE`` and
full-width ``Ａｌｉｃｅ`` are one voice); they are 1-64 characters and at most 128 bytes in UTF-8, so
the directory name fits every file system. A voice whose files are unreadable or inconsistent is
*broken*: listed separately with a reason (for operators), never breaking the other voices.
Storage failures (disk full, read-only, permissions) raise :class:`StorageError`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

try:  # Unix: work folders and names locked across processes
    import fcntl
except ImportError:  # Windows: one process per voices directory
    fcntl = None

import soundfile as sf
import torch

from ..audio.io import check_prompt_audio, load_audio
from ..errors import AudioError, CosyVoiceError, InvalidRequestError, UnknownVoiceError
from ..frontend.prompt import PromptFeatures
from .refreshed import Refreshed
from .settings import MAX_VOICES, STORAGE_WAITERS

log = logging.getLogger(__name__)
FEATURES_KEPT = 512  # voices' features kept in memory per process (up to ~0.5 MB each)

# A letter, digit or underscore of any script, then letters, digits, space, dot, dash or
# underscore; no slashes, no leading dot, no trailing space or dot: a name is always one safe
# path component. A new name also needs a letter or digit (``validate_new_name``): "__" was
# taken once, and a voice stored under it is still found and deleted.
NAME_PATTERN = re.compile(r"\w(?:[\w .-]{0,62}[\w-])?")
HAS_LETTER_OR_DIGIT = re.compile(r"[^\W_]")
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 128  # UTF-8; file systems allow 255 (eCryptfs 143)
MIN_FREE_BYTES = 64 * 1024 * 1024  # below this the library reports degraded storage
RESERVE_BYTES = 16 * 1024 * 1024  # a new voice never leaves less free (results, the spool)
HEALTH_INTERVAL = 5.0  # seconds a storage check (and the voice counts of /metrics) is reused
HEALTH_WAIT = 1.0  # seconds /ready and /metrics wait for a storage check under way
HEALTH_HUNG = 3.0  # seconds a storage check may wait on the storage before it counts as down
BUSY_RETRY_AFTER = 5  # seconds a client refused for a busy storage is told to wait
SCAN_READERS = 8  # voices a scan reads at once when it must read many (a bucket, first listed)
CHUNK_BYTES = 64 * 1024  # a stored file sent to a client is read this much at a time
LAYOUT_VERSION = 1

Encode = Callable[[bytes, str], PromptFeatures]
Read = TypeVar("Read", bytes, "Chunks")


class VoiceExistsError(InvalidRequestError):
    """A voice (saved or preset) already has this name."""


class InvalidVoiceNameError(InvalidRequestError):
    """A voice name that is not one safe path component."""


class VoiceDamagedError(CosyVoiceError):
    """A stored voice whose files are unreadable or inconsistent (a server-side fault)."""


class SaveAbandoned(CosyVoiceError):
    """A voice not stored because its request ended first (e.g. its deadline passed)."""


class StorageError(CosyVoiceError, OSError):
    """The library's storage failed: ``status`` 507 (no space) or 503 (read-only, permissions,
    I/O error). Also an OSError, which it stands for (with a message that names no path)."""

    def __init__(self, message: str, status: int, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, for a Retry-After header


class LibraryFullError(StorageError):
    """Refused before writing: the library holds ``max_voices`` voices, or the disk would be left
    nearly full. Not a failure of the storage (its health stays as it is)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 507)


class StorageBusyError(StorageError):
    """Refused before touching the storage: too many calls are waiting on it already (a hung
    bucket, a stalled network file system). Not a failure of the storage itself."""

    def __init__(self, waiting: int) -> None:
        super().__init__(
            f"the voice storage is not keeping up: {waiting} requests are waiting on it; "
            "try again later",
            503,
            BUSY_RETRY_AFTER,
        )


def storage_error(exc: OSError, action: str) -> StorageError:
    """A clean message for an OSError (never the path it carries)."""
    if isinstance(exc, StorageError):  # a store's own failure (e.g. S3): already clean
        return exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(f"cannot {action}: the voice storage is full", 507)
    if exc.errno == errno.EROFS:
        return StorageError(f"cannot {action}: the voice storage is read-only", 503)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot {action}: no permission to write the voice storage", 503)
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return StorageError(f"cannot {action}: voice storage error ({reason})", 503)


def _shown(name: str) -> str:
    return repr(name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS] + "...")


def validate_new_name(name: str) -> str:
    """``validate_name`` for a voice about to be saved, which must also hold a letter or digit."""
    normal = validate_name(name)
    if not HAS_LETTER_OR_DIGIT.search(normal):
        raise InvalidVoiceNameError(
            f"invalid voice name {_shown(name)}: it needs a letter or digit"
        )
    return normal


def validate_name(name: str) -> str:
    """The normalised (NFKC) form of ``name`` if it is a valid voice name, else raise
    InvalidVoiceNameError. Compare names with :func:`name_key`."""
    if not isinstance(name, str) or not name:
        raise InvalidVoiceNameError("a voice needs a name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidVoiceNameError("invalid voice name: it is not valid Unicode text") from None
    normal = unicodedata.normalize("NFKC", name)
    if (
        len(normal) > MAX_NAME_CHARS
        or len(normal.encode("utf-8")) > MAX_NAME_BYTES
        or not NAME_PATTERN.fullmatch(normal)
        or ".." in normal
    ):
        raise InvalidVoiceNameError(
            f"invalid voice name {_shown(name)}: use 1-{MAX_NAME_CHARS} letters, digits, spaces, "
            f"'.', '-' or '_' (at most {MAX_NAME_BYTES} bytes in UTF-8), starting with a "
            "letter, digit or '_' and not ending with a space or '.'"
        )
    if len(_letter_scripts(normal) & LOOKALIKE_SCRIPTS) > 1:
        raise InvalidVoiceNameError(
            f"invalid voice name {_shown(name)}: it mixes Latin, Cyrillic or Greek letters, "
            "which makes look-alikes of other names; use one script"
        )
    return normal


LOOKALIKE_SCRIPTS = {"LATIN", "CYRILLIC", "GREEK"}  # letters that look alike across scripts


def _letter_scripts(text: str) -> set[str]:
    return {unicodedata.name(ch, "?").split(" ")[0] for ch in text if ch.isalpha()}


NAMES_SHOWN = 20  # voice names an error message lists at most


def _no_voice(name: str) -> UnknownVoiceError:
    return UnknownVoiceError(f"no saved voice named {_shown(name)}")


def unknown_voice(voice: str, available: list[str]) -> UnknownVoiceError:
    """'unknown voice', naming the first few voices there are (a library may hold thousands:
    every typo must not return them all)."""
    shown = ", ".join(available[:NAMES_SHOWN]) or "none"
    if len(available) > NAMES_SHOWN:
        shown += f" and {len(available) - NAMES_SHOWN} more (GET /speakers lists them)"
    return UnknownVoiceError(f"unknown voice {_shown(voice)}; available: {shown}")


def name_key(name: str) -> str:
    """What makes two names the same voice: NFKC, then case folded."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


@dataclass(frozen=True)
class BrokenVoice:
    """A library entry that cannot be used, and why (no paths: safe to show to clients)."""

    name: str
    reason: str

    def to_api(self) -> dict:
        return {
            "id": self.name,
            "name": self.name,
            "object": "audio.voice",
            "kind": "saved",
            "status": "broken",
            "reason": self.reason,
        }


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    prompt_text: str
    duration: float
    sample_rate: int
    created_at: float

    def to_api(self) -> dict:
        return {
            "id": self.name,
            "name": self.name,
            "object": "audio.voice",
            "type": "audio_sample",  # (OpenAI's custom voices: made from an audio sample)
            "kind": "saved",
            "prompt_text": self.prompt_text,
            "duration": round(self.duration, 3),
            "sample_rate": self.sample_rate,
            "created_at": int(self.created_at),
        }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _features_bytes(features: PromptFeatures) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "speech_tokens": features.speech_tokens.detach().cpu().contiguous(),
            "speech_feat": features.speech_feat.detach().cpu().contiguous(),
            "embedding": features.embedding.detach().cpu().contiguous(),
            "prompt_text": features.prompt_text,
        },
        buffer,
    )
    return buffer.getvalue()


def _load_features(raw: bytes) -> PromptFeatures:
    data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    tokens, feat, embedding = data["speech_tokens"], data["speech_feat"], data["embedding"]
    if tokens.dim() != 2 or feat.dim() != 3 or embedding.dim() != 2:
        raise ValueError("unexpected tensor shapes in the stored features")
    return PromptFeatures(tokens, feat, embedding, str(data.get("prompt_text", "")))


def _read_meta(store: VoiceStore, folder: str) -> VoiceInfo:
    """voice.json of voice ``folder``, checked field by field; ValueError says what is wrong
    (never with the path). StorageError if the store itself fails."""
    try:
        raw = store.read(folder, "voice.json")
    except FileNotFoundError:
        raise ValueError("voice.json is missing") from None
    except StorageError:
        raise
    except OSError as exc:
        raise ValueError(f"voice.json cannot be read ({os.strerror(exc.errno or 0)})") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("voice.json is not valid JSON (truncated or damaged)") from None
    if not isinstance(meta, dict):
        raise ValueError("voice.json does not hold an object")
    name, text = meta.get("name"), meta.get("prompt_text", "")
    if not isinstance(name, str) or name_key(name) != name_key(folder):
        raise ValueError("the name in voice.json does not match its directory")
    if not isinstance(text, str):
        raise ValueError("prompt_text in voice.json is not text")
    numbers = {}
    for key in ("duration", "sample_rate", "created_at"):
        value = meta.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{key} in voice.json is missing or not a number")
        numbers[key] = value
    if numbers["duration"] <= 0 or numbers["sample_rate"] <= 0 or numbers["sample_rate"] % 1:
        raise ValueError("duration or sample_rate in voice.json is out of range")
    if not store.has_file(folder, "prompt.wav"):
        raise ValueError("prompt.wav is missing")
    return VoiceInfo(
        folder,
        text,
        float(numbers["duration"]),
        int(numbers["sample_rate"]),
        float(numbers["created_at"]),
    )


class Chunks:
    """A stored file open for reading, ``size`` bytes, taken in chunks of ``CHUNK_BYTES`` as
    they are sent: a download holds one chunk in memory, not the file (a 30 s recording at
    192 kHz is 23 MB as float32). Closed at its end, by ``close()``, or when dropped."""

    def __init__(self, size: int, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        self.size = size
        self._read, self._close = read, close

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        chunk = self._read(CHUNK_BYTES)
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        self._close()


class VoiceStore(Protocol):
    """Where voices' files live. A voice is a stored name with files ``voice.json``,
    ``prompt.wav`` and ``features/<key>.pt``; it is visible only once committed whole. Failures
    raise OSError (StorageError for a clean message); a missing file FileNotFoundError."""

    def open(self) -> None:
        """Prepare the storage (create it, clean up interrupted writes); OSError if unusable."""

    # whether a listing may lag behind other processes' writes (a bucket's: documented), so
    # that listings at once may share one scan; a local directory's is always current
    listing_may_lag: bool

    def entries(self) -> list[str]:
        """Stored names of the committed voices (valid or not), sorted."""

    def version(self, name: str) -> str | None:
        """What identifies voice ``name``'s voice.json as the latest ``entries()`` saw it (it
        changes whenever the voice is written again), from memory; None when not known."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held around a name's check and its write: one process at a time, where the store
        needs it to keep names unique without regard to case."""

    def has(self, name: str) -> bool:
        """Whether a voice is committed under exactly this stored name."""

    def read(self, name: str, file: str) -> bytes: ...

    def open_file(self, name: str, file: str) -> Chunks:
        """A file to read in chunks; what it reads stays readable if the voice is deleted or
        written again meanwhile."""

    def has_file(self, name: str, file: str) -> bool: ...

    def stage(self, name: str, files: dict[str, bytes]) -> object:
        """Write a voice's files where nothing sees them; returns what commit/discard take."""

    def commit(self, staged: object) -> None:
        """Make a staged voice visible at once; FileExistsError if the name is taken."""

    def discard(self, staged: object) -> None:
        """Remove what stage wrote (best effort, never raises)."""

    def write(self, name: str, file: str, data: bytes) -> None:
        """Replace one file of a committed voice atomically."""

    def remove(self, name: str) -> None:
        """Make the voice disappear at once, then free its files."""

    def check(self) -> str | None:
        """None if voices can be stored, else why not."""


class WaitBounded:
    """A :class:`VoiceStore` through which at most ``limit`` calls wait on ``store`` at once;
    the next is refused at once with :class:`StorageBusyError`. Storage calls run on the
    server's bounded thread pools (request planning, sync routes): without a bound, enough
    requests waiting on a hung bucket would take every thread from requests that never touch
    the storage (a preset voice's synthesis, /health). ``discard`` (cleanup, never raises) and
    ``check`` (one background thread) are not counted; ``waiting_on()`` counts a wait of the
    caller's own (behind the library's write lock)."""

    _COUNTED = frozenset(
        (
            "open",
            "entries",
            "has",
            "read",
            "open_file",  # (not its chunks: a slow download never holds a waiter)
            "has_file",
            "stage",
            "commit",
            "write",
            "remove",
        )
    )

    def __init__(self, store: VoiceStore, limit: int) -> None:
        if limit < 1:
            raise ValueError("the storage waiters' limit must be at least 1")
        self._store, self._limit = store, limit
        self._waiting = 0
        self._count_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Calls under way now."""
        return self._waiting

    def __getattr__(self, name: str):
        if name.startswith("_"):  # never the store's internals (nor ours, while being built)
            raise AttributeError(name)
        attr = getattr(self._store, name)
        if name not in self._COUNTED:
            return attr
        return lambda *args, **kwargs: self._counted(attr, *args, **kwargs)

    @contextlib.contextmanager
    def waiting_on(self) -> Iterator[None]:
        """The block counts as one call waiting on the storage (refused when none is free)."""
        with self._count_lock:
            if self._waiting >= self._limit:
                raise StorageBusyError(self._waiting)
            self._waiting += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._waiting -= 1

    def _counted(self, call: Callable, *args, **kwargs):
        with self.waiting_on():
            return call(*args, **kwargs)


LOCK_SUFFIX = ".lock"  # beside a work folder (.tmp-*, .trash-*): held while it is in use


def _claim(root: Path, prefix: str) -> tuple[Path, int]:
    """A fresh work folder's path ``<root>/<prefix><hex>`` (not made yet) and its lock file
    ``<path>.lock``, open and held (``flock LOCK_EX``). The lock comes before the folder and goes
    after it, so a folder whose lock can be taken, or that has none, is provably left over."""
    while True:
        path = root / f"{prefix}{uuid.uuid4().hex}"
        lock = os.open(f"{path}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is None:
            return path, lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.fstat(lock).st_nlink:  # not swept away between its creation and the lock
                return path, lock
        except BaseException:
            os.close(lock)
            raise
        os.close(lock)


def _unclaim(path: Path, lock: int) -> None:
    """Release a work folder's lock (its folder gone already: renamed or removed)."""
    with contextlib.suppress(OSError):
        os.unlink(f"{path}{LOCK_SUFFIX}")
    os.close(lock)


def _sweep_leftover(path: Path) -> None:
    """Remove work folder ``path`` (and its lock file) if no process holds its lock: left by a
    process that died. One that is in use (another server process sharing the directory) is
    left alone."""
    try:
        lock = os.open(f"{path}{LOCK_SUFFIX}", os.O_RDONLY)
    except FileNotFoundError:  # none: an older version's, or a probe (nothing in it to lose)
        lock = None
    if lock is not None and fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            return  # in use
        if not os.fstat(lock).st_nlink:  # finished meanwhile (or swept by another process)
            os.close(lock)
            return
    log.warning("removing leftover %s from an interrupted write", path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if lock is not None:
        _unclaim(path, lock)


@dataclass
class _LocalStaged:
    folder: Path  # <root>/.tmp-<hex>, locked while staged
    name: str
    files: tuple[str, ...]
    lock: int  # the held lock's descriptor; -1 once committed or discarded


class LocalVoiceStore:
    """Voices as directories under ``root`` (the layout in the module docstring). Several
    processes may share it: a work folder (``.tmp-*``, ``.trash-*``) is locked by its process,
    and ``exclusive()`` makes a name's check and its write one step across processes."""

    listing_may_lag = False

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        leftovers = {
            entry.removesuffix(LOCK_SUFFIX)
            for entry in os.listdir(self.root)
            if entry.startswith((".tmp-", ".trash-"))
        }
        for entry in sorted(leftovers):
            _sweep_leftover(self.root / entry)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held by one process at a time (``flock`` of the directory itself: no file of its
        own, and it works read-only): names are unique without regard to case across every
        process sharing the directory."""
        if fcntl is None:
            yield
            return
        folder = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # (releases the lock)

    def entries(self) -> list[str]:
        names = os.listdir(self.root)
        return sorted(n for n in names if not n.startswith(".") and (self.root / n).is_dir())

    def version(self, name: str) -> str | None:
        return None  # read anew each time: a local read is cheap

    def has(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def read(self, name: str, file: str) -> bytes:
        return (self.root / name / file).read_bytes()

    def open_file(self, name: str, file: str) -> Chunks:
        # the open file outlives the voice's deletion (POSIX), and a file is never rewritten
        # in place (replaced whole): a download in progress reads what it opened
        opened = open(self.root / name / file, "rb")  # noqa: SIM115 - closed by its Chunks
        try:
            size = os.fstat(opened.fileno()).st_size
        except BaseException:
            opened.close()
            raise
        return Chunks(size, opened.read, opened.close)

    def has_file(self, name: str, file: str) -> bool:
        return (self.root / name / file).is_file()

    def stage(self, name: str, files: dict[str, bytes]) -> _LocalStaged:
        folder, lock = _claim(self.root, ".tmp-")
        staged = _LocalStaged(folder, name, tuple(files), lock)
        try:
            for file, data in files.items():
                (folder / file).parent.mkdir(parents=True, exist_ok=True)
                _write_file(folder / file, data)
            for parent in {(folder / file).parent for file in files}:
                _fsync_dir(parent)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def commit(self, staged: _LocalStaged) -> None:
        if self.has(staged.name):
            raise FileExistsError(staged.name)
        lost = [file for file in staged.files if not (staged.folder / file).is_file()]
        if lost:  # removed by hand or by a process that ignores the locks: never half a voice
            log.error("the staged voice %r lost its files %s", staged.name, lost)
            raise FileNotFoundError(errno.ENOENT, "the staged voice lost its files")
        os.rename(staged.folder, self.root / staged.name)  # atomic: complete or not at all
        _fsync_dir(self.root)
        _unclaim(staged.folder, staged.lock)
        staged.lock = -1

    def discard(self, staged: _LocalStaged) -> None:
        if staged.lock < 0:  # committed (or discarded) already
            return
        shutil.rmtree(staged.folder, ignore_errors=True)
        _unclaim(staged.folder, staged.lock)
        staged.lock = -1

    def write(self, name: str, file: str, data: bytes) -> None:
        path = self.root / name / file
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, data)

    def remove(self, name: str) -> None:
        trash, lock = _claim(self.root, ".trash-")
        try:
            os.rename(self.root / name, trash)  # atomic: gone at once, even if cut short
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            _unclaim(trash, lock)

    def check(self) -> str | None:
        problem = None
        probe = self.root / f".tmp-probe-{uuid.uuid4().hex}"
        try:
            if shutil.disk_usage(self.root).free < MIN_FREE_BYTES:
                problem = f"less than {MIN_FREE_BYTES // 2**20} MB free for voices"
            probe.write_bytes(b"ok")
        except OSError as exc:
            problem = str(storage_error(exc, "store voices"))
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        return problem


@dataclass
class _Scan:
    """One scan of the library, shared by the calls that come while it runs."""

    changes: int  # VoiceLibrary._changes when it began
    done: threading.Event = field(default_factory=threading.Event)
    value: tuple[list[VoiceInfo], list[BrokenVoice]] | None = None
    error: BaseException | None = None

    def result(self) -> tuple[list[VoiceInfo], list[BrokenVoice]]:
        if self.error is not None or self.value is None:
            raise self.error or RuntimeError("the scan failed")
        return list(self.value[0]), list(self.value[1])  # each caller's own lists


class VoiceLibrary:
    """Saved voices in a :class:`VoiceStore` (a directory given as a path); safe to use from
    several threads."""

    def __init__(
        self,
        store: str | os.PathLike | VoiceStore,
        features_kept: int = FEATURES_KEPT,
        storage_waiters: int = STORAGE_WAITERS,
        max_voices: int = MAX_VOICES,
    ) -> None:
        self.max_voices = max_voices
        if isinstance(store, (str, os.PathLike)):
            store = LocalVoiceStore(store)
        self.store = WaitBounded(store, storage_waiters)
        self.root = getattr(store, "root", None)  # the directory of a local store
        self._lock = threading.RLock()  # the features kept; never held across storage I/O
        self._writing = threading.RLock()  # a name's check and its write (or deletion) as one
        self._write_depth = 0  # _writing's holder's nesting (the store's lock is not reentrant)
        # (name, model family key, created_at): a voice deleted and created again elsewhere
        # (a shared store) never reuses the old voice's features; the most recently used
        # ``features_kept`` only, since a voice deleted through another process is never noticed
        self._features: collections.OrderedDict[tuple[str, str, float], PromptFeatures] = (
            collections.OrderedDict()
        )
        self._features_kept = features_kept
        # read in the background: /ready and /metrics answer while the storage hangs
        self._check: Refreshed[str | None] = Refreshed(
            store.check, None, HEALTH_INTERVAL, HEALTH_WAIT, "the voice storage's health"
        )
        self._counts: Refreshed[tuple[int, int]] = Refreshed(
            self._count, (0, 0), HEALTH_INTERVAL, HEALTH_WAIT, "the voice library"
        )
        self._write_failure: tuple[float, str] | None = None
        self._warned: dict[str, float] = {}
        self._infos: dict[str, tuple[str, VoiceInfo]] = {}  # folder -> (store's version, info)
        self._scan_lock = threading.Lock()
        self._scanning: _Scan | None = None  # the scan under way, which others may share
        self._changes = 0  # voices created or deleted by this process
        self._scan_progress = 0.0  # when a scan last read something (time.monotonic())
        try:
            self.store.open()
        except StorageError:
            raise  # a shared store that cannot be reached at start: the caller says where
        except OSError as exc:  # the server still starts: /ready reports degraded storage
            log.error("voice library unavailable: %s", exc)

    def _entries(self) -> list[str]:
        """Stored names of the voices (valid or not)."""
        try:
            return self.store.entries()
        except OSError as exc:
            raise storage_error(exc, "read the voice library") from None

    def _folder(self, name: str) -> str | None:
        """The stored name of voice ``name`` (any case or compatibility form), or None."""
        normal = validate_name(name)
        try:
            exact = self.store.has(normal)
        except OSError as exc:
            raise storage_error(exc, "read the voice library") from None
        if exact:
            return normal
        key = name_key(normal)
        return next((n for n in self._entries() if name_key(n) == key), None)

    def _warn_once(self, key: str, message: str, *args) -> None:
        """One warning per minute per key: a broken voice is read on every listing."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) > 60:
            self._warned[key] = now
            log.warning(message, *args)

    # ------------------------------------------------------------------ reading
    def scan(self) -> tuple[list[VoiceInfo], list[BrokenVoice]]:
        """Every usable voice, and every broken one with its reason. Calls at once share one
        scan (many clients listing a bucket of voices), one begun since this process last
        changed the library: a voice it saved is listed. (Not a local directory's: its
        listing is cheap, and one begun earlier could miss another process's latest change.)"""
        if not self.store.listing_may_lag:
            return self._scan()
        with self._scan_lock:
            shared = self._scanning
            leader = shared is None or shared.changes != self._changes
            if leader:
                shared = self._scanning = _Scan(self._changes)
        if not leader:
            while not shared.done.wait(HEALTH_HUNG):
                if time.monotonic() - self._scan_progress >= HEALTH_HUNG:
                    # a scan that stopped reading waits on the storage: so do its sharers
                    # (counted, so that a hung storage queues no threads)
                    with self.store.waiting_on():
                        shared.done.wait()
            return shared.result()
        try:
            shared.value = self._scan()
        except BaseException as exc:
            shared.error = exc
            raise
        finally:
            with self._scan_lock:
                if self._scanning is shared:
                    self._scanning = None
            shared.done.set()
        return shared.result()

    def _scan(self) -> tuple[list[VoiceInfo], list[BrokenVoice]]:
        self._scan_progress = time.monotonic()
        entries = self._entries()
        known = {folder: info for folder in entries if (info := self._known(folder)) is not None}
        unread = [folder for folder in entries if folder not in known]
        if len(unread) > SCAN_READERS:  # e.g. a bucket's voices, first listed: a request each
            with ThreadPoolExecutor(SCAN_READERS, thread_name_prefix="voice-scan") as pool:
                found = dict(zip(unread, pool.map(self._entry, unread), strict=True))
        else:
            found = {folder: self._entry(folder) for folder in unread}
        infos = self._infos  # those of voices deleted (here or elsewhere) are forgotten
        self._infos = {folder: infos[folder] for folder in entries if folder in infos}
        listed = [known.get(folder) or found.get(folder) for folder in entries]
        return (
            [entry for entry in listed if isinstance(entry, VoiceInfo)],
            [entry for entry in listed if isinstance(entry, BrokenVoice)],
        )

    def _entry(self, folder: str) -> VoiceInfo | BrokenVoice | None:
        """Voice ``folder`` as a scan lists it; None when it was deleted while being read."""
        try:
            validate_name(folder)
            return self._meta(folder)
        except InvalidVoiceNameError:
            return BrokenVoice(folder, "the directory name is not a valid voice name")
        except ValueError as exc:
            if not self.exists(folder):
                return None  # deleted while it was being read: gone, not broken
            self._warn_once(folder, "voice %r is broken: %s", folder, exc)
            return BrokenVoice(folder, str(exc))
        finally:
            self._scan_progress = time.monotonic()

    def _known(self, folder: str) -> VoiceInfo | None:
        """The voice's info as read before, if the store says it is unchanged since."""
        version = self.store.version(folder)
        known = self._infos.get(folder)
        if version is not None and known is not None and known[0] == version:
            return known[1]
        return None

    def _meta(self, folder: str) -> VoiceInfo:
        """voice.json of ``folder``, read and checked once per version the store names (a voice
        bucket: each voice's manifest ETag, a scan needing no request for unchanged voices)."""
        version = self.store.version(folder)
        info = _read_meta(self.store, folder)
        if version is not None and self.store.version(folder) == version:  # what was read
            self._infos[folder] = (version, info)
        return info

    def list(self) -> list[VoiceInfo]:
        return self.scan()[0]

    def broken(self) -> list[BrokenVoice]:
        return self.scan()[1]

    def names(self) -> list[str]:
        return [voice.name for voice in self.list()]

    def listed_names(self) -> list[str]:
        """The stored voices' names from the listing alone, broken ones included: what an error
        hint shows (an unknown voice), without reading every voice (a bucket of thousands)."""
        return self._entries()

    def exists(self, name: str) -> bool:
        """Whether a voice (usable or broken) has this name, in any case or compatibility form."""
        try:
            return self._folder(name) is not None
        except StorageBusyError:
            raise  # not asked: the voice may well exist (a 404 or a new voice would be wrong)
        except (InvalidRequestError, StorageError):
            return False

    def get(self, name: str) -> VoiceInfo:
        folder = self._folder(name)
        if folder is None:
            raise _no_voice(name)
        try:
            return _read_meta(self.store, folder)
        except ValueError as exc:
            if not self.exists(name):  # deleted meanwhile: gone, not damaged
                raise _no_voice(name) from None
            raise VoiceDamagedError(
                f"saved voice {folder!r} is damaged: {exc}; delete it and create it again"
            ) from None

    def audio_path(self, name: str) -> Path:
        """The file of the stored prompt recording (a local store only; else see audio())."""
        if self.root is None:
            raise TypeError("the voices are not stored in a local directory")
        return self.root / self.get(name).name / "prompt.wav"

    def audio(self, name: str) -> bytes:
        """The stored prompt recording (WAV bytes)."""
        return self._prompt(name, self.store.read)

    def open_audio(self, name: str) -> Chunks:
        """The stored prompt recording (WAV), open to be sent in chunks; errors (an unknown
        voice, a damaged one, the storage failing) come here, before any of it is sent."""
        return self._prompt(name, self.store.open_file)

    def _prompt(self, name: str, read: Callable[[str, str], Read]) -> Read:
        folder = self.get(name).name
        try:
            return read(folder, "prompt.wav")
        except FileNotFoundError:
            if not self.exists(name):  # deleted meanwhile: gone, not damaged
                raise _no_voice(name) from None
            raise VoiceDamagedError(
                f"saved voice {folder!r} is damaged: prompt.wav is missing; delete it and create "
                "it again"
            ) from None
        except OSError as exc:
            raise storage_error(exc, "read the voice") from None

    # ------------------------------------------------------------------ storage health
    def _failed(self, error: StorageError) -> StorageError:
        if not isinstance(error, StorageBusyError):  # refused, not failed: the storage's health
            self._write_failure = (time.monotonic(), str(error))  # check says if it is down
        return error

    @property
    def storage_waiting(self) -> int:
        """Storage calls under way now (``STORAGE_WAITERS`` at most)."""
        return self.store.waiting

    def health(self) -> str | None:
        """None if voices can be stored, else why not: the latest storage check (checked every
        few seconds in the background, never waited on for long), or a write that failed in
        the last minute (e.g. full, then freed a little)."""
        problem, waiting = self._check.get()
        if waiting is not None and waiting >= HEALTH_HUNG:
            problem = f"the voice storage has not answered for {waiting:.0f} s"
        if problem is None and self._write_failure is not None:
            when, message = self._write_failure
            if time.monotonic() - when < 60:
                problem = message
        return problem

    def counts(self) -> tuple[int, int]:
        """(usable voices, broken ones), read every few seconds in the background (/metrics)."""
        return self._counts.get()[0]

    def _count(self) -> tuple[int, int]:
        voices, broken = self.scan()
        return len(voices), len(broken)

    # ------------------------------------------------------------------ writing
    def create(
        self,
        name: str,
        audio: bytes,
        prompt_text: str,
        key: str,
        encode: Encode,
        max_seconds: float | None = None,
        may_commit: Callable[[], bool] | None = None,
    ) -> VoiceInfo:
        """Decode and check ``audio``, compute its features with ``encode``, and store the voice
        atomically. Raises AudioError for bad audio, VoiceExistsError if the name is taken (in
        any case), StorageError if it cannot be written, SaveAbandoned (nothing stored) if
        ``may_commit``, asked once just before the commit, says no (e.g. the request's deadline
        passed: its client was answered already)."""
        name = validate_new_name(name)
        if self.exists(name):
            raise VoiceExistsError(f"a voice named {name!r} already exists; delete it first")
        self._check_room()  # before the features are computed
        try:
            wav, rate = load_audio(audio, max_seconds=max_seconds)
            check_prompt_audio(wav, rate, max_seconds=max_seconds or 30.0)
        except AudioError as exc:  # named as the engine names a prompt (route_fields maps it)
            raise AudioError(str(exc), "prompt_audio") from None
        buffer = io.BytesIO()
        sf.write(buffer, wav.numpy(), rate, format="WAV", subtype="FLOAT")
        stored = buffer.getvalue()
        prompt_text = prompt_text.strip()
        features = encode(stored, prompt_text)  # from the stored bytes: reproducible later
        info = VoiceInfo(name, prompt_text, wav.numel() / rate, rate, time.time())

        meta = {**asdict(info), "layout": LAYOUT_VERSION}
        files = {  # voice.json last: a store that cannot rename writes its files in this order
            "prompt.wav": stored,
            f"features/{key}.pt": _features_bytes(features),
            "voice.json": json.dumps(meta, ensure_ascii=False, indent=1).encode(),
        }
        taken = VoiceExistsError(f"a voice named {name!r} already exists; delete it first")
        staged, refused = None, False
        try:
            self._check_room(sum(len(data) for data in files.values()))
            staged = self.store.stage(name, files)
            with self._write_lock():
                if self.exists(name):
                    raise taken
                self._check_room()  # (created meanwhile by another request)
                if may_commit is not None and not may_commit():
                    raise SaveAbandoned("the request ended before the voice was stored")
                try:
                    self.store.commit(staged)  # the voice appears complete or not at all
                except FileExistsError:  # e.g. committed meanwhile by another server process
                    raise taken from None
                self._keep_features((name, key, info.created_at), features)
        except StorageBusyError:
            refused = True
            raise
        except LibraryFullError:  # the storage did not fail
            raise
        except OSError as exc:
            raise self._failed(storage_error(exc, "save the voice")) from None
        finally:
            if staged is not None and refused:  # answered at once; the cleanup may wait
                threading.Thread(
                    target=self.store.discard, args=(staged,), name="voice-discard", daemon=True
                ).start()
            elif staged is not None:
                self.store.discard(staged)
        self._write_failure = None
        self._changed()
        return info

    def _check_room(self, size: int = 0) -> None:
        """StorageError 507 when the library holds ``max_voices`` voices, or a local store would
        keep less than ``RESERVE_BYTES`` free after ``size`` more bytes (a full disk also fails
        saving results and the spool)."""
        held = len(self._entries())
        if held >= self.max_voices:
            raise LibraryFullError(
                f"the voice library holds {held} voices, its limit (the server's --max-voices): "
                "delete some first"
            )
        if size and self.root is not None:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                return  # the write itself says what is wrong
            if free - size < RESERVE_BYTES:
                raise LibraryFullError(
                    "cannot save the voice: the voice storage is full (less than "
                    f"{RESERVE_BYTES // 2**20} MB would be left free)"
                )

    def delete(self, name: str) -> str:
        """Remove voice ``name`` (usable or broken); returns the name it was stored under."""
        with self._write_lock():
            folder = self._folder(name)
            if folder is None:
                raise _no_voice(name)
            try:
                self.store.remove(folder)  # atomic: gone at once, even if cut short
            except FileNotFoundError:  # deleted meanwhile by another process sharing the store
                raise _no_voice(name) from None
            except OSError as exc:
                raise self._failed(storage_error(exc, "delete the voice")) from None
            with self._lock:
                for cached in [k for k in self._features if k[0] == folder]:
                    del self._features[cached]
        self._changed()
        return folder

    def _changed(self) -> None:
        """This process created or deleted a voice: later listings and counts show it."""
        with self._scan_lock:
            self._changes += 1
        self._counts.expire()

    # ------------------------------------------------------------------ features
    def _unusable(self, name: str, exc: Exception) -> CosyVoiceError:
        """The error for a voice whose stored recording cannot be encoded: gone if deleted
        meanwhile, else damaged."""
        if not self.exists(name):
            return _no_voice(name)
        return VoiceDamagedError(
            f"saved voice {name!r} is damaged: its stored recording cannot be used "
            f"({type(exc).__name__}); delete it and create it again"
        )

    def features(self, name: str, key: str, encode: Encode) -> PromptFeatures:
        """The voice's features for model family ``key``: from memory, from disk, or computed
        once from the stored prompt and saved (when the disk allows; else kept in memory)."""
        info = self.get(name)
        name = info.name
        version = (name, key, info.created_at)
        with self._lock:
            cached = self._features.get(version)
            if cached is not None:
                self._features.move_to_end(version)
        if cached is not None:
            return cached
        file = f"features/{key}.pt"
        features = None
        try:
            raw = self.store.read(name, file)
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise storage_error(exc, "read the voice") from None
        if raw is not None:
            try:
                features = _load_features(raw)
            except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                self._warn_once(
                    f"{name}/{key}",
                    "recomputing damaged features of %r: %s",
                    name,
                    type(exc).__name__,
                )
        if features is None:
            try:
                audio = self.store.read(name, "prompt.wav")
                features = encode(audio, info.prompt_text)
            except StorageError:
                raise
            except InvalidRequestError as exc:
                if isinstance(exc, AudioError) or not self.exists(name):
                    raise self._unusable(name, exc) from None
                # a transcript saved through another model (a library shared by servers of
                # several versions) with markup this one does not know: not damaged, and never
                # to be deleted for it
                raise InvalidRequestError(
                    f"saved voice {name!r} has a transcript this model cannot read: {exc}; "
                    "save the recording again under another name for this model",
                    param="voice",
                ) from None
            except Exception as exc:  # noqa: BLE001 - the stored prompt is ours, not the client's
                raise self._unusable(name, exc) from None
            self._store_features(info, file, features)

        with self._write_lock():  # not kept for a voice deleted meanwhile
            if self.exists(name):
                self._keep_features(version, features)
        return features

    def _store_features(self, info: VoiceInfo, file: str, features: PromptFeatures) -> None:
        """Save features computed from ``info``'s recording into that voice alone: not into a
        voice deleted meanwhile, nor into a new one of the same name (another recording)."""
        name = info.name
        with self._write_lock():
            try:
                if self.get(name).created_at != info.created_at:
                    return
                self.store.write(name, file, _features_bytes(features))
            except (UnknownVoiceError, VoiceDamagedError):
                return  # deleted meanwhile, or its metadata broken: nothing to keep them with
            except FileNotFoundError:
                if not self.exists(name):
                    return  # deleted meanwhile: not a storage failure
                raise
            except OSError as exc:  # serve from memory; the cache is written once storage heals
                self._failed(storage_error(exc, "cache the voice's features"))
                self._warn_once(
                    f"cache/{name}",
                    "features of %r kept in memory only: %s",
                    name,
                    os.strerror(exc.errno or 0),
                )

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """``_writing`` and the store's lock across processes (``exclusive``, taken by the
        outermost holder only), the wait for them counted as a wait on the storage: a write or a
        delete holds them across storage I/O, so a hung storage would otherwise queue any number
        of threads behind it."""
        with contextlib.ExitStack() as held:
            with self.store.waiting_on():
                self._writing.acquire()
                held.callback(self._writing.release)
                if not self._write_depth:
                    try:
                        held.enter_context(self.store.exclusive())
                    except OSError as exc:  # (the directory gone, locks unsupported)
                        raise storage_error(exc, "write the voice library") from None
            self._write_depth += 1
            try:
                yield
            finally:
                self._write_depth -= 1

    def _keep_features(self, version: tuple[str, str, float], features: PromptFeatures) -> None:
        with self._lock:
            self._features[version] = features
            self._features.move_to_end(version)
            while len(self._features) > self._features_kept:
                self._features.popitem(last=False)
