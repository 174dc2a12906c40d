"""Server settings: limits, security, storage. Plain data, filled by the CLI or by callers."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..request import MAX_INSTRUCT_CHARS, MAX_PROMPT_SECONDS, MAX_PROMPT_TEXT_CHARS

# Defined here, not in voices.py, which imports torch: `serve`'s option errors come before any
# heavy import (~3 s).
MAX_VOICES = 1000  # voices a library holds at most (Settings.max_voices): each is up to ~22 MB
# storage calls (and waits behind a write) under way at once, more refused: the default and the
# most Settings.storage_waiters allows, below the server's 40 threads for blocking routes (anyio)
# and its 64 planning threads, so that requests which never touch the storage keep some
STORAGE_WAITERS = 32


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
    connect_timeout: float = 5.0  # seconds per connection attempt
    read_timeout: float = 30.0  # seconds without an answer before an attempt fails
    max_attempts: int = 3  # tries per object (standard retry mode, backing off between tries)


@dataclass
class Settings:
    """Everything the HTTP layer needs to know besides the engine."""

    # As OpenAI's speech API: longer texts are split into sentences (at most ~80 characters each,
    # the models' guidance) and spoken segment by segment, each sent as soon as it is made.
    max_text_chars: int = 4096
    max_instruct_chars: int = 500  # instruct (/tts) and instructions (OpenAI API)
    max_prompt_text_chars: int = 1000  # the transcript of a prompt recording (30 s at most)
    max_upload_bytes: int = 10 * 1024 * 1024
    # any body that is not multipart/form-data; None: room for a base64 prompt of max_upload_bytes
    max_json_bytes: int | None = None
    max_prompt_seconds: float = MAX_PROMPT_SECONDS
    # requests the engine loop computes together (its batch, Engine.load max_batch)
    workers: int = 8
    max_queue: int = 8  # requests allowed to wait for a worker; beyond that: 429
    request_timeout: float = 300.0  # seconds from acceptance to the last audio byte
    api_key: str | None = None  # if set, "Authorization: Bearer <key>" is required
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    # the Host names requests may carry (empty: any): a server on a loopback address takes
    # only its own names, so that a site whose name is rebound to 127.0.0.1 cannot read it
    allowed_hosts: list[str] = field(default_factory=list)
    voices_dir: Path = field(default_factory=default_voices_dir)
    outputs_dir: Path | None = None  # save every result (audio + JSON metadata) here
    outputs_keep_days: float | None = None  # and remove them after this many days (None: keep)
    s3: S3Settings | None = None
    # the voice library in a bucket shared by several server processes (else voices_dir)
    voices_s3: S3Settings | None = None
    # with S3 and no outputs_dir, results wait here until uploaded (default: <voices_dir>/.spool)
    spool_dir: Path | None = None
    log_requests: bool = True
    # OpenAI voice names (alloy, echo, ...) -> voices of this server, over the default mapping
    voice_aliases: dict[str, str] = field(default_factory=dict)
    prompt_cache_size: int = 32  # one-off prompts whose features are kept (LRU)
    # saved voices prepared for streaming once the model is loaded, most recently saved first
    # (as many as the engine's prompt cache holds; voice_create.prepare_saved_voices)
    max_voices: int = MAX_VOICES  # saved voices at most (more: 507); each is up to ~22 MB
    prepare_voices: int = 4
    # calls that may wait on the voice storage at once; more are refused (503, Retry-After) at
    # once, so a hung bucket cannot take every thread of the server's pools
    storage_waiters: int = STORAGE_WAITERS
    prompt_cache_ttl: float = 600.0  # seconds a cached one-off prompt lives after its last use
    # /docs, /redoc and /openapi.json need the API key when one is set, unless this is True
    docs_public: bool = False
    security_headers: bool = True  # nosniff, frame and referrer policy; a CSP for the page
    # connections (applied by the uvicorn options of `serve`, see cli.py)
    header_timeout: float = 10.0  # seconds for a client to send its request line and headers
    body_timeout: float = 30.0  # seconds without any body bytes while a body is being read
    # seconds a client may leave its response unread (its socket full) before it is dropped:
    # a player that reads as it plays drains it in far less
    send_timeout: float = 60.0
    keep_alive_timeout: float = 5.0  # idle seconds between requests on a kept-alive connection
    max_connections: int = 512  # open connections at most (more are answered 503 and closed)
    shutdown_timeout: float = 10.0  # seconds a graceful stop waits for requests and uploads

    def __post_init__(self) -> None:
        for item in fields(self):  # (inf, nan: a timeout of inf broke /info's JSON, a 500)
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite number, got {value}")
        for name in (
            "max_text_chars",
            "max_instruct_chars",
            "max_prompt_text_chars",
            "max_upload_bytes",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name, most in (
            ("max_instruct_chars", MAX_INSTRUCT_CHARS),
            ("max_prompt_text_chars", MAX_PROMPT_TEXT_CHARS),
        ):
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be at most {most} (the engine's limit)")
        if self.api_key == "":  # ("--api-key $KEY" with KEY unset ran without one)
            raise ValueError("the API key is empty: give None to run without one")
        if self.api_key is not None and not (
            self.api_key.isascii() and self.api_key.isprintable() and self.api_key.strip()
        ):
            # a header carries it: a UTF-8 key (curl, SDKs) never matched the one decoded here
            raise ValueError("the API key must be printable ASCII characters (no spaces only)")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            # a request's token is read stripped: every request would have been refused
            raise ValueError("the API key starts or ends with a space: remove it")
        # as a request's Host is read (case, port, brackets, a final dot), however given
        self.allowed_hosts = list(dict.fromkeys(host_name(name) for name in self.allowed_hosts))
        if self.max_json_bytes is None:
            self.max_json_bytes = self.max_upload_bytes * 4 // 3 + 64 * 1024
        if self.max_json_bytes < 1:
            raise ValueError("max_json_bytes must be at least 1")
        for name in (
            "header_timeout",
            "body_timeout",
            "send_timeout",
            "keep_alive_timeout",
            "shutdown_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if not 1 <= self.storage_waiters <= STORAGE_WAITERS:
            raise ValueError(
                f"storage_waiters must be 1-{STORAGE_WAITERS}: more would let a hung voice "
                "storage hold every thread of the server's pools"
            )
        if self.max_voices < 1:
            raise ValueError("max_voices must be at least 1")
        if self.prepare_voices < 0:
            raise ValueError("prepare_voices must be 0 or more")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if not 0 < self.max_prompt_seconds <= MAX_PROMPT_SECONDS:
            raise ValueError(f"max_prompt_seconds must be in (0, {MAX_PROMPT_SECONDS:g}]")
        self.voices_dir = Path(self.voices_dir).expanduser()
        self.spool_dir = Path(self.spool_dir or self.voices_dir / ".spool").expanduser()
        if self.outputs_dir is not None:
            self.outputs_dir = Path(self.outputs_dir).expanduser()
        if self.outputs_keep_days is not None:
            if self.outputs_dir is None:
                raise ValueError("outputs_keep_days applies to an outputs_dir (--outputs-dir)")
            if not 0 < self.outputs_keep_days < 1e6:
                raise ValueError("outputs_keep_days must be a positive number of days")


def host_name(host: str) -> str:
    """The name in a Host header or an --allowed-host value: lower case, without its port,
    brackets or a final dot ("[::1]:8080" -> "::1", "LocalHost.:80" -> "localhost")."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name.rstrip(".")
