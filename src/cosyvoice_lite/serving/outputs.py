"""Optional keeping of results: every finished synthesis saved under an outputs directory
(audio + JSON metadata) and/or uploaded to S3-compatible storage (boto3, imported lazily).

Saving runs on its own thread so it never holds a synthesis worker or delays a response.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
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
    except ImportError as exc:  # optional extra
        raise RuntimeError("S3 upload needs boto3: pip install 'cosyvoice-lite[s3]'") from exc
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)


class OutputStore:
    """Where results go after synthesis; a no-op when neither a directory nor S3 is configured."""

    def __init__(self, directory: Path | None, s3: S3Settings | None, metrics: Metrics) -> None:
        self.directory = directory
        self.s3 = s3
        self.metrics = metrics
        self._client = make_s3_client(s3) if s3 is not None else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outputs")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.directory is not None or self.s3 is not None

    def submit(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> Future | None:
        if not self.enabled or len(samples) == 0:
            return None
        return self._pool.submit(self._save, request_id, samples, sample_rate, format, meta)

    def _save(
        self, request_id: str, samples: np.ndarray, sample_rate: int, format: str, meta: dict
    ) -> None:
        # Raw PCM has no header, so results are kept as WAV in that case.
        fmt = "wav" if format == "pcm" or format not in AUDIO_FORMATS else format
        ext = "ogg" if fmt == "opus" else fmt
        now = datetime.now(timezone.utc)
        audio = encode_audio(samples, sample_rate, fmt)
        name = f"{now:%Y%m%dT%H%M%S}-{request_id}"
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
        if self.directory is not None:
            try:
                day = self.directory / f"{now:%Y-%m-%d}"
                day.mkdir(parents=True, exist_ok=True)
                _write_atomic(day / f"{name}.{ext}", audio)
                _write_atomic(day / f"{name}.json", meta_bytes)  # metadata last: marks completion
                self.metrics.count("outputs_saved_total")
            except OSError as exc:
                log.error("could not save result %s: %s", request_id, exc)
        if self._client is not None:
            prefix = f"{self.s3.prefix.strip('/')}/" if self.s3.prefix.strip("/") else ""
            key = f"{prefix}{now:%Y-%m-%d}/{name}"
            try:
                self._client.put_object(
                    Bucket=self.s3.bucket,
                    Key=f"{key}.{ext}",
                    Body=audio,
                    ContentType=AUDIO_FORMATS[fmt][2],
                )
                self._client.put_object(
                    Bucket=self.s3.bucket,
                    Key=f"{key}.json",
                    Body=meta_bytes,
                    ContentType="application/json",
                )
                self.metrics.count("s3_uploads_total")
            except Exception as exc:  # noqa: BLE001 - storage trouble must not break serving
                self.metrics.count("s3_upload_errors_total")
                log.error("S3 upload of %s failed: %s", request_id, exc)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
