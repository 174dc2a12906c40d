"""Optional keeping of results: every finished synthesis saved under an outputs directory
(audio + JSON metadata) and/or uploaded to S3-compatible storage (boto3, imported lazily).

Saving runs on its own thread so it never holds a synthesis worker or delays a response.

With S3, every result is first saved locally (in the outputs directory, or else in a spool
directory) with a hidden ``.<name>.s3-pending`` marker; the upload (bounded connect/read timeouts,
a bounded number of tries) removes the marker, and the spooled copy, once both objects are up. A
failed upload keeps its marker: it is tried again when the server next starts, so nothing finished
is lost while S3 is down. Uploads are counted done/failed, with a gauge of pending ones; a
graceful stop waits at most ``shutdown_timeout`` for them (the rest stay pending on disk).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..audio.io import AUDIO_FORMATS, encode_audio
from .metrics import Metrics
from .settings import S3Settings

log = logging.getLogger(__name__)


def _write_atomic(path: Path, data: bytes) -> None:
    # the temporary name must not match "*.json" globs of readers waiting for the result
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    ) -> None:
        self.directory = directory
        self.s3 = s3
        self.metrics = metrics
        self.shutdown_timeout = shutdown_timeout
        self._client = make_s3_client(s3) if s3 is not None else None
        # S3 results are kept locally until uploaded: in the outputs directory, else the spool
        self.local = directory if directory is not None else (spool_dir if s3 else None)
        if s3 is not None and self.local is None:
            raise ValueError("S3 upload needs an outputs or spool directory to save results first")
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # results saved or being saved that are not uploaded yet
        self._thread: threading.Thread | None = None
        metrics.gauge(
            "s3_uploads_pending", "Results waiting for their S3 upload.", lambda: self.pending
        )
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        if self.enabled:
            # a daemon thread: a hung upload never keeps the process from exiting
            self._thread = threading.Thread(target=self._work, name="outputs", daemon=True)
            self._thread.start()
        if self._client is not None:
            for marker in sorted(self.local.rglob(f".*{MARKER_SUFFIX}")):
                self._put(("upload", marker))  # left over from the last run: try again

    @property
    def enabled(self) -> bool:
        return self.directory is not None or self.s3 is not None

    def _put(self, item) -> None:
        with self._lock:
            self.pending += self._client is not None
        self._queue.put(item)

    def submit(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> None:
        if not self.enabled or len(samples) == 0:
            return
        self._put(("save", (request_id, samples, sample_rate, format, meta)))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            kind, args = item
            if kind == "call":  # flush(): everything before it is done
                args.set()
                continue
            try:
                if kind == "save":
                    marker = self._save(*args)
                    if marker is not None:
                        self._upload(marker)
                else:
                    self._upload(args)
            except Exception as exc:  # noqa: BLE001 - keeping results must never stop serving
                log.error("could not keep a result: %s", exc)
            finally:
                with self._lock:
                    self.pending -= self._client is not None

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
            "sample_rate": sample_rate,
            "duration": round(len(samples) / sample_rate, 3),
            "audio_file": f"{name}.{ext}",
        }
        meta_bytes = json.dumps(meta, ensure_ascii=False, indent=1).encode()
        day = self.local / f"{now:%Y-%m-%d}"
        try:
            day.mkdir(parents=True, exist_ok=True)
            _write_atomic(day / f"{name}.{ext}", audio)
            _write_atomic(day / f"{name}.json", meta_bytes)  # metadata last: marks completion
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
            _write_atomic(marker, json.dumps(task).encode())
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
        self._queue.put(("call", done))
        return done.wait(timeout)

    def shutdown(self) -> None:
        """Stop after the queued work, waiting at most ``shutdown_timeout`` seconds; whatever is
        still pending stays on disk with its marker and is uploaded at the next start."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(self.shutdown_timeout)
        if self._thread.is_alive():
            log.warning(
                "stopping with %d result(s) not uploaded yet; they are kept under the "
                "outputs/spool directory and uploaded at the next start",
                self.pending,
            )
