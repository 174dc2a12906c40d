"""Server settings: limits, security, storage. Plain data, filled by the CLI or by callers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..audio.io import MAX_PROMPT_SECONDS


def default_voices_dir() -> Path:
    """``$COSYVOICE_LITE_VOICES``, else ``$XDG_DATA_HOME/cosyvoice-lite/voices``
    (``~/.local/share/...``): saved voices are user data, not a cache."""
    env = os.environ.get("COSYVOICE_LITE_VOICES")
    if env:
        return Path(env).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home).expanduser() / "cosyvoice-lite" / "voices"


@dataclass
class S3Settings:
    """Where finished results are uploaded (any S3-compatible store; needs boto3)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO or moto
    region: str | None = None


@dataclass
class Settings:
    """Everything the HTTP layer needs to know besides the engine."""

    # As OpenAI's speech API: longer texts are split into sentences (at most ~80 characters each,
    # the models' guidance) and spoken segment by segment, each sent as soon as it is made.
    max_text_chars: int = 4096
    max_upload_bytes: int = 10 * 1024 * 1024
    max_prompt_seconds: float = MAX_PROMPT_SECONDS
    workers: int = 1  # synthesis threads running at once (CPU: one is usually best)
    max_queue: int = 8  # requests allowed to wait for a worker; beyond that: 429
    request_timeout: float = 300.0  # seconds from acceptance to the last audio byte
    api_key: str | None = None  # if set, "Authorization: Bearer <key>" is required
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    voices_dir: Path = field(default_factory=default_voices_dir)
    outputs_dir: Path | None = None  # save every result (audio + JSON metadata) here
    s3: S3Settings | None = None
    log_requests: bool = True
    # OpenAI voice names (alloy, echo, ...) -> voices of this server, over the default mapping
    voice_aliases: dict[str, str] = field(default_factory=dict)
    prompt_cache_size: int = 32  # one-off prompts whose features are kept (LRU)
    prompt_cache_ttl: float = 600.0  # seconds a cached one-off prompt lives after its last use

    def __post_init__(self) -> None:
        if self.max_text_chars < 1:
            raise ValueError("max_text_chars must be at least 1")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if not 0 < self.max_prompt_seconds <= MAX_PROMPT_SECONDS:
            raise ValueError(f"max_prompt_seconds must be in (0, {MAX_PROMPT_SECONDS:g}]")
        self.voices_dir = Path(self.voices_dir).expanduser()
        if self.outputs_dir is not None:
            self.outputs_dir = Path(self.outputs_dir).expanduser()
