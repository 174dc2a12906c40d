"""Optional keeping of results: every finished synthesis saved under an outputs directory
(audio + JSON metadata) and/or uploaded to S3-compatible storage (boto3, imported lazily).

Saving runs on its own thread so it never holds a synthesis worker or delays a response.

With S3, every result is first saved locally (in the outputs directory, or else in a spool
directory) with a hidden ``.<name>.s3-pending`` marker, as soon as it is finished; uploads run on
a thread of their own (bounded connect/read timeouts, a bounded number of tries), so a slow or
hung S3 never holds the local saves back. An upload removes the marker, and the spooled copy,
once both objects are up. A failed upload keeps its marker: it is tried again when the server
next starts, so nothing finished is lost while S3 is down. Uploads are counted done/failed, with
a gauge of pending ones; a graceful stop waits at most ``shutdown_timeout`` for the saves, then
the uploads (those not done stay pending on disk).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
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
            "S3 upload needs boto3 (the 's3' extra): pip install -e '.[s3]'"
        ) from exc
    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
    )
    return boto3.client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


MARKER_SUFFIX = ".s3-pending"
DAY_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")  # the folders results are saved in, by UTC day
PRUNE_INTERVAL = 3600.0  # seconds between checks for results past --outputs-keep-days
_STOP = object()


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
    ) -> None:
        """``keep_days``: results in ``directory`` are removed after that many days (a day's
        folder at a time, checked every ``prune_every`` seconds on the save thread; a folder
        with an upload still pending is kept); None keeps them all."""
        self.directory = directory
        self.keep_days, self.prune_every = keep_days, prune_every
        self._pruned_at = -float("inf")
        self.s3 = s3
        self.metrics = metrics
        self.shutdown_timeout = shutdown_timeout
        self._client = make_s3_client(s3) if s3 is not None else None
        # S3 results are kept locally until uploaded: in the outputs directory, else the spool
        self.local = directory if directory is not None else (spool_dir if s3 else None)
        if s3 is not None and self.local is None:
            raise ValueError("S3 upload needs an outputs or spool directory to save results first")
        self._saves: queue.Queue = queue.Queue()  # results to write locally
        self._uploads: queue.Queue = queue.Queue()  # markers of results to upload
        self._lock = threading.Lock()
        self.pending = 0  # results saved or being saved that are not uploaded yet
        self.unsaved = 0  # results submitted and not written yet (in memory)
        self._threads: list[threading.Thread] = []
        metrics.gauge(
            "s3_uploads_pending", "Results waiting for their S3 upload.", lambda: self.pending
        )
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        # daemon threads: a hung upload never keeps the process from exiting
        if self.enabled:
            self._threads.append(self._start(self._save_loop, "outputs-save"))
        if self._client is not None:
            self._threads.append(self._start(self._upload_loop, "outputs-upload"))
            for marker in sorted(self.local.rglob(f".*{MARKER_SUFFIX}")):
                with self._lock:  # left over from the last run: try again
                    self.pending += 1
                self._uploads.put(("upload", marker))

    @staticmethod
    def _start(target, name: str) -> threading.Thread:  # noqa: ANN001
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    @property
    def enabled(self) -> bool:
        return self.directory is not None or self.s3 is not None

    def submit(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> None:
        if not self.enabled or len(samples) == 0:
            return
        with self._lock:
            self.pending += self._client is not None
            self.unsaved += 1
        self._saves.put(("save", (request_id, samples, sample_rate, format, meta)))

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
            marker = None
            try:
                marker = self._save(*args)
            except Exception as exc:  # noqa: BLE001 - keeping results must never stop serving
                log.error("could not keep a result: %s", exc)
            finally:
                with self._lock:
                    self.unsaved -= 1
                    self.pending -= self._client is not None and marker is None
            if marker is not None:
                self._uploads.put(("upload", marker))

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

    def _upload_loop(self) -> None:
        while True:
            item = self._uploads.get()
            if item is _STOP:
                return
            kind, args = item
            if kind == "call":
                args.set()
                continue
            try:
                self._upload(args)
            except Exception as exc:  # noqa: BLE001 - keeping results must never stop serving
                log.error("could not upload a result: %s", exc)
            finally:
                with self._lock:
                    self.pending -= 1

    def _save(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> Path | None:
        """Write audio + metadata locally; with S3, also the pending marker (returned)."""
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
        meta_bytes = json.dumps(meta, ensure_ascii=False, indent=1).encode()
        day = self.local / f"{now:%Y-%m-%d}"
        try:
            day.mkdir(parents=True, exist_ok=True)
            write_atomic(day / f"{name}.{ext}", audio)
            write_atomic(day / f"{name}.json", meta_bytes)  # metadata last: marks completion
            if self.directory is not None:
                self.metrics.count("outputs_saved_total")
            if self._client is None:
                return None
            marker = day / f".{name}{MARKER_SUFFIX}"
            task = {
                "key": f"{now:%Y-%m-%d}/{name}",  # the prefix configured at upload time goes first
                "audio": f"{name}.{ext}",
                "meta": f"{name}.json",
                "content_type": AUDIO_FORMATS[fmt][2],
                "spooled": self.directory is None,
            }
            write_atomic(marker, json.dumps(task).encode())
            return marker
        except OSError as exc:
            log.error("could not save result %s: %s", request_id, os.strerror(exc.errno or 0))
            if self._client is None:
                return None
            self.metrics.count("s3_upload_errors_total")  # nothing kept: the result is lost
            return None

    def _upload(self, marker: Path) -> None:
        try:
            task = json.loads(marker.read_text())
            audio = (marker.parent / task["audio"]).read_bytes()
            meta = (marker.parent / task["meta"]).read_bytes()
        except (OSError, ValueError, KeyError) as exc:
            log.error("dropping unreadable pending upload %s: %s", marker.name, exc)
            self.metrics.count("s3_upload_errors_total")
            marker.unlink(missing_ok=True)
            return
        prefix = f"{self.s3.prefix.strip('/')}/" if self.s3.prefix.strip("/") else ""
        key = prefix + task["key"]
        try:
            self._client.put_object(
                Bucket=self.s3.bucket,
                Key=f"{key}.{task['audio'].rsplit('.', 1)[1]}",
                Body=audio,
                ContentType=task["content_type"],
            )
            self._client.put_object(
                Bucket=self.s3.bucket,
                Key=f"{key}.json",
                Body=meta,
                ContentType="application/json",
            )
        except Exception as exc:  # noqa: BLE001 - storage trouble must not break serving
            self.metrics.count("s3_upload_errors_total")
            log.error(
                "S3 upload of %s failed (kept locally, retried at the next start): %s",
                task["audio"],
                exc,
            )
            return
        self.metrics.count("s3_uploads_total")
        marker.unlink(missing_ok=True)
        if task.get("spooled"):
            for name in (task["audio"], task["meta"]):
                (marker.parent / name).unlink(missing_ok=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is saved and uploaded (or failed)."""
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
            unsaved, pending = self.unsaved, self.pending
        if unsaved:
            log.error("stopping with %d finished result(s) not saved yet: they are lost", unsaved)
        if pending - unsaved > 0:
            log.warning(
                "stopping with %d result(s) not uploaded yet; they are kept under the "
                "outputs/spool directory and uploaded at the next start",
                pending - unsaved,
            )
