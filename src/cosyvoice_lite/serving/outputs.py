"""Optional keeping of results: every finished synthesis saved under an outputs directory
(audio + JSON metadata) and/or uploaded to S3-compatible storage (boto3, imported lazily).

Saving runs on its own thread so it never holds a synthesis worker or delays a response.

With S3, every result is first saved locally (in the outputs directory, or else in a spool
directory) as soon as it is finished, behind a hidden ``.<name>.s3-pending`` marker written
before its files; uploads run on a thread of their own (bounded connect/read timeouts, a bounded
number of tries), so a slow or hung S3 never holds the local saves back. An upload removes the
spooled copy, then the marker, once both objects are up. A failed upload keeps its marker and
is tried again while the server runs (after a pause that doubles at each failure in a row, up
to ``retry_most``) and at the next start, so nothing finished is lost while S3 is down. A
spooled copy is removed only once uploaded: a file that cannot be read for now (out of
descriptors, an I/O error) is tried again later, and a damaged marker is dropped with its
result's files left alone. A result whose local copy cannot be written (a full disk) is uploaded
straight from memory, within ``memory_budget`` bytes held and only while S3 is not failing
(else it is lost at once, logged and counted: memory stays bounded).
Uploads are counted done/failed, with a gauge of the results waiting; ``health()`` says why
results are not kept as configured. A graceful stop waits at most ``shutdown_timeout`` for the
saves, then the uploads (those not done stay pending on disk).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..audio.io import AUDIO_FORMATS, encode_audio
from ..files import write_atomic
from .metrics import Metrics
from .settings import S3Settings
from .streaming import output_rate

log = logging.getLogger(__name__)


def make_s3_client(settings: S3Settings):
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # optional extra
        raise RuntimeError(
            "S3 upload needs boto3 (the 's3' extra): pip install 'boto3>=1.34'"
        ) from exc
    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
    )
    return boto3.client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def s3_error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ('' for connection failures and others)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def s3_reason(exc: Exception) -> str:
    """Why an S3 call failed, fit to show anyone: its error code, else the exception's class
    (EndpointConnectionError). Never its text, which names the endpoint, bucket and key (other
    clients' request ids): that goes to the log only."""
    return s3_error_code(exc) or type(exc).__name__


MARKER_SUFFIX = ".s3-pending"
DAY_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")  # the folders results are saved in, by UTC day
# files.temporary_path's names: a write cut short (by a crash) leaves one behind
PARTIAL = re.compile(r"\.(?:.+\.|cosyvoice-lite-)[0-9a-f]{32}\.partial")
PRUNE_INTERVAL = 3600.0  # seconds between checks for results past --outputs-keep-days
RETRY_FIRST = 5.0  # seconds before a failed upload is tried again, doubled at each failure in a row
RETRY_MOST = 300.0  # ... up to this
# a marker whose files are missing is a save in progress (another process's) until this old
# (seconds); older, a save cut short: dropped
SETTLE = 60.0
SAVE_FAILURE_SHOWN = 60.0  # seconds health() reports a local save that failed
MEMORY_BUDGET = 64 * 2**20  # bytes of results held in memory for upload (unsaved) at most
_STOP = object()


@dataclass
class _Result:
    """A finished result, encoded: its files and, with S3, its upload (the marker's content)."""

    request_id: str
    folder: Path
    name: str
    audio_name: str
    audio: bytes
    meta: bytes
    task: dict

    def files(self, with_marker: bool) -> list[tuple[Path, bytes]]:
        # the marker first: a save cut short leaves it, so the next start uploads or removes
        # what was written (files without one would be kept for good, never uploaded)
        files = [
            (self.folder / self.audio_name, self.audio),
            (self.folder / f"{self.name}.json", self.meta),
        ]
        if with_marker:
            files.insert(
                0, (self.folder / f".{self.name}{MARKER_SUFFIX}", json.dumps(self.task).encode())
            )
        return files


class OutputStore:
    """Where results go after synthesis; a no-op when neither a directory nor S3 is configured."""

    def __init__(
        self,
        directory: Path | None,
        s3: S3Settings | None,
        metrics: Metrics,
        spool_dir: Path | None = None,
        shutdown_timeout: float = 10.0,
        keep_days: float | None = None,
        prune_every: float = PRUNE_INTERVAL,
        retry_first: float = RETRY_FIRST,
        retry_most: float = RETRY_MOST,
        memory_budget: int = MEMORY_BUDGET,
    ) -> None:
        """``keep_days``: results in ``directory`` are removed after that many days (a day's
        folder at a time, checked every ``prune_every`` seconds on the save thread; a folder
        with an upload still pending is kept); None keeps them all. A failed upload is tried
        again after ``retry_first`` seconds, twice that after a second failure in a row, and so
        on up to ``retry_most``. Results that cannot be saved locally are held in memory for
        their upload up to ``memory_budget`` bytes in all."""
        self.directory = directory
        self.keep_days, self.prune_every = keep_days, prune_every
        self.retry_first, self.retry_most = retry_first, retry_most
        self.memory_budget = memory_budget
        self._pruned_at = -float("inf")
        self.s3 = s3
        self.metrics = metrics
        self.shutdown_timeout = shutdown_timeout
        self._client = make_s3_client(s3) if s3 is not None else None
        # S3 results are kept locally until uploaded: in the outputs directory, else the spool
        self.local = directory if directory is not None else (spool_dir if s3 else None)
        if s3 is not None and self.local is None:
            raise ValueError("S3 upload needs an outputs or spool directory to save results first")
        self._started = time.time()
        self._saves: queue.Queue = queue.Queue()  # results to write locally
        self._uploads: queue.Queue = queue.Queue()  # markers (and results in memory) to upload
        self._lock = threading.Lock()
        self._markers: set[Path] = set()  # results saved that wait for their upload
        self._due: list[tuple[float, int, Path]] = []  # those, by when to try (upload thread's)
        self._order = itertools.count()  # (first come, first tried among those due together)
        self._in_memory = 0  # results not saved locally, to upload from memory
        self._held_bytes = 0  # ... their size
        self._unreadable: dict[Path, float] = {}  # marker -> pause after its latest read error
        self.unsaved = 0  # results submitted and not written yet (in memory)
        self.lost = 0  # results neither kept locally nor uploaded
        self.save_errors = 0
        self._backoff = 0.0  # the pause after the latest failure in a row (none: 0)
        self._paused_until = 0.0  # (monotonic) no upload from disk before: S3 is failing
        self._failing: tuple[float, str] | None = None  # (since, why) while uploads fail
        self._save_failure: tuple[float, str] | None = None  # (when, why) the latest
        self._threads: list[threading.Thread] = []
        self._register_metrics()
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            self._recover(spool_dir)
        # daemon threads: a hung upload never keeps the process from exiting
        if self.enabled:
            self._threads.append(self._start(self._save_loop, "outputs-save"))
        if self._client is not None:
            self._threads.append(self._start(self._upload_loop, "outputs-upload"))

    def _register_metrics(self) -> None:
        m = self.metrics
        m.gauge(
            "s3_uploads_pending",
            "Results waiting for their S3 upload (saved locally, or held in memory).",
            lambda: self.pending,
        )
        m.gauge(
            "outputs_ok",
            "1 while results are kept as configured (else see /ready or the log).",
            lambda: 0.0 if self.health() else 1.0,
        )
        m.counter(
            "outputs_save_errors_total",
            "Results whose local copy could not be written.",
            lambda: self.save_errors,
        )
        m.counter(
            "outputs_lost_total",
            "Finished results neither kept locally nor uploaded.",
            lambda: self.lost,
        )

    @staticmethod
    def _start(target, name: str) -> threading.Thread:  # noqa: ANN001
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    @property
    def enabled(self) -> bool:
        return self.directory is not None or self.s3 is not None

    @property
    def pending(self) -> int:
        """Results not uploaded yet: saved with a marker, being saved, or held in memory."""
        with self._lock:
            if self._client is None:
                return 0
            return len(self._markers) + self.unsaved + self._in_memory

    def health(self) -> str | None:
        """None while results are kept as configured, else why not: S3 uploads failing (since
        the first failure in a row until one succeeds), or a local save that failed lately."""
        failing, saved = self._failing, self._save_failure
        if failing is not None:
            since, why = failing
            return (
                f"S3 uploads failing for {time.monotonic() - since:.0f} s "
                f"({self.pending} result(s) waiting): {why}"
            )
        if saved is not None and time.monotonic() - saved[0] < SAVE_FAILURE_SHOWN:
            return f"results could not be saved locally: {saved[1]}"
        return None

    def submit(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> None:
        if not self.enabled or len(samples) == 0:
            return
        with self._lock:
            self.unsaved += 1
        self._saves.put(("save", (request_id, samples, sample_rate, format, meta)))

    # ------------------------------------------------------------------ startup
    def _recover(self, spool_dir: Path | None) -> None:
        """What the last run left: its temporary files removed (writes cut short); with S3,
        its markers queued for upload (the spool's too, if results now go to the outputs
        directory)."""
        roots = [self.local]
        if self._client is not None and spool_dir is not None and spool_dir != self.local:
            roots.append(spool_dir)
        removed = 0
        for root in roots:
            for folder in _day_folders(root):
                for path in _listing(folder):
                    if PARTIAL.fullmatch(path.name):
                        removed += self._remove_leftover(path)
                    elif self._client is not None and _is_marker(path):
                        self._markers.add(path)
                        self._uploads.put(("upload", path))
        if removed:
            log.info("removed %d temporary file(s) left by saves cut short", removed)

    def _remove_leftover(self, path: Path) -> bool:
        """A temporary file of a save from before this start (another process's may be live)."""
        try:
            if path.lstat().st_mtime >= self._started:
                return False
            path.unlink()
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------ saving
    def _save_loop(self) -> None:
        while True:
            try:
                self._prune()
            except Exception as exc:  # noqa: BLE001 - housekeeping must never stop the saves
                log.error("could not remove old results: %s", exc)
            try:
                item = self._saves.get(timeout=self.prune_every if self.keep_days else None)
            except queue.Empty:
                continue
            if item is _STOP:
                if self._client is not None:
                    self._uploads.put(_STOP)  # after the markers of every save
                return
            kind, args = item
            if kind == "call":  # flush(): every save before it is done; then its uploads
                if self._client is not None:
                    self._uploads.put(item)
                else:
                    args.set()
                continue
            try:
                self._keep(*args)
            except Exception as exc:  # noqa: BLE001 - keeping results must never stop serving
                log.error("could not keep a result: %s", exc)
                with self._lock:
                    self.lost += 1
            finally:
                with self._lock:
                    self.unsaved -= 1

    def _prune(self) -> None:
        """Day folders past ``keep_days`` removed (at most once per ``prune_every``)."""
        if self.keep_days is None or time.monotonic() - self._pruned_at < self.prune_every:
            return
        self._pruned_at = time.monotonic()
        now = datetime.now(timezone.utc)
        if not self.directory.is_dir():  # (removed by hand: the next save makes it again)
            return
        for folder in sorted(self.directory.iterdir()):
            if not DAY_FOLDER.fullmatch(folder.name):  # not one of ours: left alone
                continue
            try:
                day = datetime.strptime(folder.name, "%Y-%m-%d").replace(tzinfo=timezone.utc)
            except ValueError:
                continue
            age_days = (now - day).total_seconds() / 86400 - 1  # its last result's age at least
            if age_days <= self.keep_days or not folder.is_dir() or folder.is_symlink():
                continue
            if any(folder.glob(f".*{MARKER_SUFFIX}")):
                continue  # an upload still pending: nothing is lost before it is up
            try:
                removed = sum(1 for path in folder.iterdir() if not path.name.startswith("."))
            except OSError:  # gone or unreadable meanwhile: the next pass sees it again
                continue
            shutil.rmtree(folder, ignore_errors=True)
            self.metrics.count("outputs_removed_total", removed)
            log.info("removed %d results of %s (--outputs-keep-days)", removed, folder.name)

    def _keep(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> None:
        """Save a result locally (with S3: then queue its upload); if it cannot be written,
        with S3 it is uploaded from memory, else it is lost."""
        result = self._encode(request_id, samples, sample_rate, format, meta)
        try:
            marker = self._write(result)
        except OSError as exc:
            self._save_failed(result, exc)
            return
        if self.directory is not None:
            self.metrics.count("outputs_saved_total")
        if marker is not None:
            with self._lock:
                self._markers.add(marker)
            self._uploads.put(("upload", marker))

    def _encode(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> _Result:
        # Raw PCM has no header, so results are kept as WAV in that case.
        fmt = "wav" if format == "pcm" or format not in AUDIO_FORMATS else format
        ext = "ogg" if fmt == "opus" else fmt
        now = datetime.now(timezone.utc)
        audio = encode_audio(samples, sample_rate, fmt)
        # unique whatever the request id (clients choose it): the id stays last, for globs
        name = f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}-{request_id}"
        meta = {
            **meta,
            "id": request_id,
            "created_at": now.isoformat(),
            "format": fmt,
            "sample_rate": output_rate(fmt, sample_rate),  # (opus: 48 kHz where it resamples)
            "duration": round(len(samples) / sample_rate, 3),
            "audio_file": f"{name}.{ext}",
        }
        task = {
            "key": f"{now:%Y-%m-%d}/{name}",  # the prefix configured at upload time goes first
            "audio": f"{name}.{ext}",
            "meta": f"{name}.json",
            "content_type": AUDIO_FORMATS[fmt][2],
            "spooled": self.directory is None,
        }
        meta_bytes = json.dumps(meta, ensure_ascii=False, indent=1).encode()
        folder = self.local / f"{now:%Y-%m-%d}"  # (set whenever the store is enabled)
        return _Result(request_id, folder, name, f"{name}.{ext}", audio, meta_bytes, task)

    def _write(self, result: _Result) -> Path | None:
        """The result's files written (with S3, its marker first: returned); on a failure,
        whatever was written is removed again (the marker last) and the error raised."""
        written: list[Path] = []
        try:
            result.folder.mkdir(parents=True, exist_ok=True)
            for path, data in result.files(with_marker=self._client is not None):
                write_atomic(path, data)
                written.append(path)
        except OSError:
            for path in reversed(written):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        return written[0] if self._client is not None else None

    def _save_failed(self, result: _Result, exc: OSError) -> None:
        # shown by the public /ready: never the error's text (it names the path)
        why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        size = len(result.audio) + len(result.meta)
        with self._lock:
            self.save_errors += 1
            self._save_failure = (time.monotonic(), why)
            # held for an upload only within the budget and while S3 answers: a full disk with
            # a slow or failing S3 held every later result (10 MB/s on a busy server)
            if self._client is None:
                lost = ""
            elif self._paused_until > time.monotonic():
                lost = "; S3 uploads are failing"
            elif self._held_bytes + size > self.memory_budget:
                lost = f"; {self._held_bytes:,} bytes of results wait in memory already"
            else:
                lost = None
            self.lost += lost is not None
            if lost is None:
                self._in_memory += 1
                self._held_bytes += size
        if lost is not None:
            log.error("could not save result %s (it is lost): %s%s", result.request_id, exc, lost)
            return
        log.error(
            "could not save result %s locally (%s): uploading it from memory",
            result.request_id,
            exc,
        )
        self._uploads.put(("memory", result))

    # ------------------------------------------------------------------ uploading
    def _upload_loop(self) -> None:
        while True:
            try:
                item = self._uploads.get(timeout=self._wait())
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            kind, args = item if item is not None else (None, None)
            if kind == "upload":
                self._schedule(args, time.monotonic())
            elif kind == "memory":
                self._upload_held(args)
            self._upload_due()
            if kind == "call":  # flush(): after the uploads due now
                args.set()

    def _wait(self) -> float | None:
        """Seconds until the next upload from disk is due (None: none waits)."""
        if not self._due:
            return None
        return max(0.0, max(self._due[0][0], self._paused_until) - time.monotonic())

    def _schedule(self, marker: Path, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._order), marker))

    def _upload_due(self) -> None:
        while self._due and max(self._due[0][0], self._paused_until) <= time.monotonic():
            marker = heapq.heappop(self._due)[2]
            try:
                self._upload(marker)
            except Exception as exc:  # noqa: BLE001 - keeping results must never stop serving
                log.error("could not upload %s (tried again at the next start): %s", marker, exc)
                self._forget(marker)

    def _upload(self, marker: Path) -> None:
        task = None
        try:
            task = _task(marker.read_text())
            audio = (marker.parent / task["audio"]).read_bytes()
            meta = (marker.parent / task["meta"]).read_bytes()
        except FileNotFoundError:
            self._incomplete(marker, task)
            return
        except OSError as exc:  # (out of descriptors, an I/O error): not the result's fault
            self._unreadable_now(marker, exc)
            return
        except (ValueError, KeyError, TypeError) as exc:  # the marker itself is damaged
            self._drop(marker, f"damaged ({exc}); any files of its result stay in {marker.parent}")
            return
        self._unreadable.pop(marker, None)
        try:
            self._put(task, audio, meta)
        except Exception as exc:  # noqa: BLE001 - storage trouble must not break serving
            self._failed(exc)
            log.error(
                "S3 upload of %s failed (kept locally, tried again in %.0f s): %s",
                task["audio"],
                self._backoff,
                exc,
            )
            self._schedule(marker, self._paused_until)
            return
        self._succeeded()
        if task.get("spooled"):  # the copy before its marker: nothing is left without one
            self._remove_files(marker, task)
        marker.unlink(missing_ok=True)
        self._forget(marker)

    def _upload_held(self, result: _Result) -> None:
        """A result that could not be saved locally: one try from memory, none while S3 is
        failing (each would hold up the uploads behind it for the client's whole timeout)."""
        try:
            if self._paused_until > time.monotonic():
                why = f"S3 uploads are failing: {self._failing[1] if self._failing else ''}"
            else:
                try:
                    self._put(result.task, result.audio, result.meta)
                except Exception as exc:  # noqa: BLE001 - storage trouble must not break serving
                    self._failed(exc)
                    why = str(exc)
                else:
                    self._succeeded()
                    return
            with self._lock:
                self.lost += 1
            log.error(
                "S3 upload of %s failed, and it could not be saved locally: it is lost (%s)",
                result.audio_name,
                why,
            )
        finally:
            with self._lock:
                self._in_memory -= 1
                self._held_bytes -= len(result.audio) + len(result.meta)

    def _put(self, task: dict, audio: bytes, meta: bytes) -> None:
        prefix = f"{self.s3.prefix.strip('/')}/" if self.s3.prefix.strip("/") else ""
        key = prefix + task["key"]
        self._client.put_object(
            Bucket=self.s3.bucket,
            Key=f"{key}.{task['audio'].rsplit('.', 1)[1]}",
            Body=audio,
            ContentType=task["content_type"],
        )
        self._client.put_object(
            Bucket=self.s3.bucket, Key=f"{key}.json", Body=meta, ContentType="application/json"
        )

    def _failed(self, exc: Exception) -> None:
        """S3 failing: uploads from disk paused, longer at each failure in a row."""
        self.metrics.count("s3_upload_errors_total")
        self._backoff = self._next_pause(self._backoff)
        now = time.monotonic()
        self._paused_until = now + self._backoff
        since = self._failing[0] if self._failing is not None else now
        # shown by the public /ready: the code alone (the callers log the whole error)
        self._failing = (since, s3_reason(exc))

    def _next_pause(self, last: float) -> float:
        """The wait after another failure in a row: retry_first, doubling up to retry_most."""
        return min(self.retry_most, max(self.retry_first, last * 2))

    def _succeeded(self) -> None:
        """S3 answers again: what waits on disk goes now."""
        self.metrics.count("s3_uploads_total")
        self._backoff, self._paused_until, self._failing = 0.0, 0.0, None

    def _unreadable_now(self, marker: Path, exc: OSError) -> None:
        """A pending result that cannot be read for now: tried again after a pause of its own
        (doubling like S3's); S3 is not failing for that, and nothing is removed or lost."""
        self._unreadable[marker] = pause = self._next_pause(self._unreadable.get(marker, 0.0))
        log.error("cannot read pending upload %s (tried again in %.0f s): %s", marker, pause, exc)
        self._schedule(marker, time.monotonic() + pause)

    def _incomplete(self, marker: Path, task: dict | None) -> None:
        """A marker without its files: a save in progress (by another process sharing the
        directory) while young; else a save cut short, or removed by hand."""
        try:
            age = time.time() - marker.stat().st_mtime
        except FileNotFoundError:  # the marker itself gone (uploaded by another process)
            self._forget(marker)
            return
        except OSError as exc:
            self._unreadable_now(marker, exc)
            return
        if age < SETTLE:
            self._schedule(marker, time.monotonic() + SETTLE - age)
        else:
            # what it wrote goes too (never complete), from an outputs directory as well
            self._drop(marker, "its files are missing (a save cut short)", task)

    def _drop(self, marker: Path, why: str, task: dict | None = None) -> None:
        """The marker removed (the result counted lost), and ``task``'s files if given."""
        log.error("dropping pending upload %s: %s", marker.name, why)
        self.metrics.count("s3_upload_errors_total")
        with self._lock:
            self.lost += 1
        if task is not None:
            self._remove_files(marker, task)
        marker.unlink(missing_ok=True)
        self._forget(marker)

    @staticmethod
    def _remove_files(marker: Path, task: dict) -> None:
        for name in (task["audio"], task["meta"]):
            (marker.parent / name).unlink(missing_ok=True)

    def _forget(self, marker: Path) -> None:
        self._unreadable.pop(marker, None)
        with self._lock:
            self._markers.discard(marker)

    # ------------------------------------------------------------------ stopping
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is saved, and uploaded or failed once (an
        upload paused by earlier failures is not waited for)."""
        done = threading.Event()
        self._saves.put(("call", done))
        return done.wait(timeout)

    def shutdown(self) -> None:
        """Stop after the queued work, waiting at most ``shutdown_timeout`` seconds in all for
        the saves, then the uploads; a result not uploaded stays on disk with its marker and is
        uploaded at the next start. Results not even saved by then are lost (said in the log)."""
        if not self._threads:
            return
        self._saves.put(_STOP)
        deadline = time.monotonic() + self.shutdown_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            unsaved, held, waiting = self.unsaved, self._in_memory, len(self._markers)
        if unsaved or held:
            log.error(
                "stopping with %d finished result(s) not saved nor uploaded yet: they are lost",
                unsaved + held,
            )
        if waiting:
            log.warning(
                "stopping with %d result(s) not uploaded yet; they are kept under the "
                "outputs/spool directory and uploaded at the next start",
                waiting,
            )


def _day_folders(root: Path) -> list[Path]:
    """The day folders results are saved in under ``root`` (none if it is unreadable)."""
    return [
        path
        for path in _listing(root)
        if DAY_FOLDER.fullmatch(path.name) and path.is_dir() and not path.is_symlink()
    ]


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _is_marker(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(MARKER_SUFFIX)


def _task(text: str) -> dict:
    """A marker's content, checked (ValueError, TypeError, KeyError: it is damaged)."""
    task = json.loads(text)
    for field in ("key", "content_type"):
        if not isinstance(task[field], str):
            raise TypeError(f"{field} is not a string")
    _plain(task["meta"])
    if "." not in _plain(task["audio"]):
        raise ValueError(f"no extension: {task['audio']!r}")
    return task


def _plain(name: str) -> str:
    """A file name from a marker, taken only as a name in the marker's folder."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    return name
