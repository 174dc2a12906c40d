"""``cosyvoice-lite serve``: run the HTTP server (FastAPI on plain uvicorn)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
from pathlib import Path


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    serve = subparsers.add_parser(
        "serve",
        help="run the speech server (simple API, OpenAI API, voice library, web page)",
        description="Serve a model over HTTP. The model loads in the background: /health answers "
        "at once, /ready once the model is loaded and warm. The web page is at /.",
    )
    from ..cli import add_model_args  # the model options of `say` and `voices` too

    add_model_args(serve)
    serve.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    serve.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-text-chars",
        type=int,
        default=4096,
        help="longest text per request (default 4096, as OpenAI); longer than ~80 characters "
        "is split into sentences and sent segment by segment",
    )
    limits.add_argument(
        "--max-instruct-chars",
        type=int,
        default=500,
        help="longest instruct/instructions (default 500)",
    )
    limits.add_argument(
        "--max-prompt-text-chars",
        type=int,
        default=1000,
        help="longest prompt transcript (default 1000)",
    )
    limits.add_argument(
        "--max-json-mb",
        type=float,
        help="largest JSON body (default: room for a base64 prompt upload)",
    )
    limits.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest prompt upload (default 10)"
    )
    limits.add_argument(
        "--max-prompt-seconds",
        type=float,
        default=30.0,
        help="longest prompt recording, and voice conversion source (at most 30)",
    )
    limits.add_argument(
        "--max-batch",
        "--workers",
        dest="workers",
        type=int,
        default=8,
        metavar="N",
        help="requests the engine loop computes together (decoded as one batch); more wait in "
        "the queue (default 8; --workers is the same option)",
    )
    limits.add_argument(
        "--audio-workers",
        type=int,
        default=2,
        help="threads computing the flow and vocoder chunks of different requests (default 2)",
    )
    limits.add_argument(
        "--idle-release-seconds",
        type=float,
        default=10.0,
        help="after this long with no request, freed memory goes back to the OS (the next "
        "request then runs a few percent slower); 0: never",
    )
    limits.add_argument(
        "--prompt-cache-mb",
        type=int,
        default=2048,
        help="memory for voices' prompt frames through the streaming flow (v2/v3), computed once "
        "per voice and shared by its streams; 0 computes them per stream (default 2048)",
    )
    limits.add_argument(
        "--max-voices",
        type=int,
        default=1000,
        help="saved voices the library holds at most; more are refused with 507 (default 1000)",
    )
    limits.add_argument(
        "--prepare-voices",
        type=int,
        default=4,
        help="saved voices whose prompt frames are computed once the model is loaded, most "
        "recently saved first, as many as --prompt-cache-mb holds (their first streams start "
        "fast after a restart); 0: none",
    )
    limits.add_argument(
        "--stream-cache-mb",
        type=_mb_or_none,
        default=256,  # Engine.load's default
        help="threshold on each stream's own flow history (v2/v3, MiB); past it the history stops "
        "growing and the later frames are re-solved at every audio piece, as the official "
        "re-solves its whole history, so a stream's memory is bounded whatever its length "
        "(default 256; none: unbounded, fastest for long streams)",
    )
    limits.add_argument(
        "--stream-cache-dtype",
        choices=("float16", "float32"),
        default=None,
        help="dtype of the streams' flow keys/values and voices' prompt frames (v2/v3, float32 "
        "weights): float16 halves their memory for a rounding (streamed mel ~1e-5 relative) "
        "(default: exact float32; float16 with --quantize int8)",
    )
    limits.add_argument(
        "--max-queue",
        type=int,
        default=8,
        help="requests allowed to wait; more get 429 with Retry-After (default 8)",
    )
    limits.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="per-request timeout, seconds, the body's arrival included (default 300)",
    )
    ops = serve.add_argument_group("operations")
    ops.add_argument(
        "--api-key",
        type=_api_key,  # (argparse applies it to the variable's value too: a string default)
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}; an empty one "
        "is an error, not a server without a key)",
    )
    ops.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from this origin (repeatable; '*' for any)",
    )
    ops.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name requests may carry (repeatable; '*' for any), besides a loopback "
        "--host's own localhost, 127.0.0.1 and ::1. Default: without --api-key on a loopback "
        "--host, those only (no DNS rebinding); else any",
    )
    ops.add_argument(
        "--voices-dir",
        type=_directory,
        help="voice library directory (default $COSYVOICE_LITE_VOICES, else "
        "$XDG_DATA_HOME/cosyvoice-lite/voices, i.e. ~/.local/share/cosyvoice-lite/voices)",
    )
    ops.add_argument("--outputs-dir", type=_directory, help="save every result (audio + JSON) here")
    ops.add_argument(
        "--outputs-keep-days",
        type=float,
        help="remove results from --outputs-dir after this many days (a day's folder at a time; "
        "one whose S3 upload is pending is kept); default: keep them all",
    )
    ops.add_argument("--s3-bucket", help="upload every result to this S3 bucket (needs boto3)")
    ops.add_argument("--s3-prefix", default="", help="key prefix inside --s3-bucket")
    ops.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint (MinIO, moto, ...) of --s3-bucket and --voices-s3-bucket",
    )
    ops.add_argument("--s3-region", help="S3 region of --s3-bucket and --voices-s3-bucket")
    ops.add_argument(
        "--spool-dir",
        type=_directory,
        help="with S3 and no --outputs-dir: where results wait until uploaded "
        "(default <voices-dir>/.spool)",
    )
    ops.add_argument(
        "--storage-waiters",
        type=int,
        default=32,
        help="calls that may wait on the voice storage at once (1-32); more get 503 with "
        "Retry-After at once, so a hung bucket cannot take every thread (default 32)",
    )
    ops.add_argument(
        "--voice-alias",
        action="append",
        default=[],
        metavar="NAME=VOICE",
        help="map a voice name clients send (e.g. OpenAI's alloy) to a preset or saved voice "
        "(repeatable; default: OpenAI's names map to presets where the model has them)",
    )
    ops.add_argument("--log-format", choices=["json", "text"], default="json")
    ops.add_argument(
        "--docs-public",
        action="store_true",
        help="serve /docs, /redoc and /openapi.json without the API key",
    )
    conn = serve.add_argument_group("connections (see docs/OPERATIONS.md)")
    conn.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at most; more get 503 at once (default 512)",
    )
    conn.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds to send the request line and headers (default 10)",
    )
    conn.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds without body bytes while a body is read (default 30; the whole body "
        "within --timeout)",
    )
    conn.add_argument(
        "--send-timeout",
        type=float,
        default=60.0,
        help="seconds a client may leave its response unread before it is dropped (default 60)",
    )
    conn.add_argument(
        "--keep-alive",
        type=float,
        default=5.0,
        help="idle seconds between requests on one connection (default 5)",
    )
    conn.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds a graceful stop waits for requests and uploads (default 10)",
    )
    add_ray_options(serve)
    serve.set_defaults(func=cmd_serve)
    return serve


def add_ray_options(serve: argparse.ArgumentParser) -> None:
    """Several replicas on Ray Serve and a shared voice library (docs/DEPLOYMENT.md)."""
    cluster = serve.add_argument_group("Ray Serve: several replicas (needs the 'ray' extra)")
    cluster.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve's HTTP proxy (at --host/--port), one model per replica",
    )
    count = cluster.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, default=1, help="replicas (default 1)")
    count.add_argument(
        "--autoscale", metavar="MIN:MAX", help="scale replicas on ongoing requests (e.g. 1:4)"
    )
    cluster.add_argument(
        "--ray-address", help="join a running cluster (e.g. auto); default: start one here"
    )
    cluster.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica")
    cluster.add_argument(
        "--replica-gpus", type=float, default=0.0, help="GPUs per replica (e.g. 0.5 or 1)"
    )
    cluster.add_argument(
        "--place-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="fail a deploy whose replicas no node takes within SECONDS (default 120; 0: no "
        "limit and no check of the nodes' sizes, for a cluster that adds nodes)",
    )
    cluster.add_argument(
        "--voices-s3-bucket",
        help="keep the voice library in this S3 bucket, shared by all replicas "
        "(--s3-endpoint-url and --s3-region apply)",
    )
    cluster.add_argument(
        "--voices-s3-prefix", default="", help="key prefix inside --voices-s3-bucket"
    )


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1"]


def allowed_hosts(host: str, given: list[str], keyed: bool = False) -> list[str]:
    """The Host names a server listening on ``host`` takes (empty: any). By default a keyless
    one on a loopback address (a desktop's) takes its own names only: a site whose name is
    rebound to 127.0.0.1 could read it otherwise. With a key (a server behind a proxy, which
    may pass its own Host) any: a rebound page does not have the key."""
    if "*" in given:
        return []
    loopback = host in (*LOOPBACK_NAMES, "[::1]")
    if loopback:  # its own names stay answered (a rebound site never sends them)
        return [*given, *LOOPBACK_NAMES] if given or not keyed else []
    return given  # (read as Host headers are by Settings)


API_KEY_VARIABLE = "COSYVOICE_LITE_API_KEY"

# Settings' fields and Engine.load's options -> the serve option that sets them: an error names
# what the user typed ("workers must be at least 1" was about --max-batch)
OPTION_FLAGS = {
    "max_text_chars": "--max-text-chars",
    "max_instruct_chars": "--max-instruct-chars",
    "max_prompt_text_chars": "--max-prompt-text-chars",
    "max_upload_bytes": "--max-upload-mb",
    "max_json_bytes": "--max-json-mb",
    "max_prompt_seconds": "--max-prompt-seconds",
    "workers": "--max-batch",
    "max_batch": "--max-batch",
    "max_queue": "--max-queue",
    "request_timeout": "--timeout",
    "max_voices": "--max-voices",
    "prepare_voices": "--prepare-voices",
    "storage_waiters": "--storage-waiters",
    "outputs_keep_days": "--outputs-keep-days",
    "header_timeout": "--header-timeout",
    "body_timeout": "--body-timeout",
    "send_timeout": "--send-timeout",
    "keep_alive_timeout": "--keep-alive",
    "max_connections": "--max-connections",
    "shutdown_timeout": "--shutdown-timeout",
    "audio_workers": "--audio-workers",
    "idle_release_seconds": "--idle-release-seconds",
    "prompt_cache_mb": "--prompt-cache-mb",
    "stream_cache_mb": "--stream-cache-mb",
    "stream_cache_dtype": "--stream-cache-dtype",
    "llm_checkpoint": "--llm",
    "onnx_dir": "--onnx-dir",
}
# a name alone, not a part of a path (a model directory ".../workers/m")
_FIELD_NAMES = re.compile(r"(?<![\w/\\.~-])(" + "|".join(OPTION_FLAGS) + r")(?![\w/\\.-])")


def as_flags(message: str) -> str:
    """``message`` with the settings' and load options' names as the serve options' flags."""
    return _FIELD_NAMES.sub(lambda match: OPTION_FLAGS[match.group(1)], message)


# Ray-only options and their defaults: without --ray they were dropped without a word
RAY_ONLY = {
    "replicas": 1,
    "autoscale": None,
    "ray_address": None,
    "replica_cpus": 1.0,
    "replica_gpus": 0.0,
    "place_timeout": 120.0,
}


def check_ray_only_options(args: argparse.Namespace) -> None:
    """A CosyVoiceError for an option of Ray Serve's given without --ray."""
    from ..errors import CosyVoiceError

    if args.ray:
        return
    for name, default in RAY_ONLY.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise CosyVoiceError(
                f"{flag} applies with --ray (replicas on Ray Serve): add --ray, or leave it out"
            )


# S3 options and the bucket options whose clients they shape: without one of these they were
# dropped without a word (--s3-endpoint-url and --s3-region serve both buckets' clients)
S3_SHAPING = {
    "s3_prefix": ("s3_bucket",),
    "spool_dir": ("s3_bucket",),
    "s3_endpoint_url": ("s3_bucket", "voices_s3_bucket"),
    "s3_region": ("s3_bucket", "voices_s3_bucket"),
    "voices_s3_prefix": ("voices_s3_bucket",),
}
_S3_BUCKETS = {"s3_bucket": "results uploaded to S3", "voices_s3_bucket": "voices kept in S3"}


def check_s3_shaping_options(args: argparse.Namespace) -> None:
    """A ValueError for an S3 option given without a bucket option it applies to (so a Serve
    config's args are refused as the command line's are)."""
    for name, buckets in S3_SHAPING.items():
        if getattr(args, name, None) in (None, "") or any(getattr(args, b) for b in buckets):
            continue
        flag = "--" + name.replace("_", "-")
        needs = " or ".join("--" + b.replace("_", "-") for b in buckets)
        what = " or ".join(_S3_BUCKETS[b] for b in buckets)
        add = needs if len(buckets) == 1 else "one"
        raise ValueError(f"{flag} applies with {needs} ({what}): add {add}, or leave it out")


def settings_from_args(args: argparse.Namespace):
    """The Settings of the serve options (a ValueError naming the option for bad ones)."""
    try:
        return _settings_from_args(args)
    except ValueError as exc:
        raise ValueError(as_flags(str(exc))) from None


def _settings_from_args(args: argparse.Namespace):
    from .settings import S3Settings, Settings

    for flag, megabytes in (
        ("--max-upload-mb", args.max_upload_mb),
        ("--max-json-mb", args.max_json_mb),
    ):
        # (checked in MiB, as given: --max-json-mb 0 meant the default)
        if megabytes is not None and not 0 < megabytes < math.inf:
            raise ValueError(f"{flag} must be a positive number of MiB, got {megabytes:g}")
    if args.outputs_keep_days is not None and args.outputs_dir is None:
        raise ValueError("--outputs-keep-days applies with --outputs-dir")
    check_s3_shaping_options(args)
    s3 = None
    if args.s3_bucket:
        s3 = S3Settings(args.s3_bucket, args.s3_prefix, args.s3_endpoint_url, args.s3_region)
    extra = {"voices_dir": args.voices_dir} if args.voices_dir else {}
    if args.voices_s3_bucket:
        extra["voices_s3"] = S3Settings(
            args.voices_s3_bucket, args.voices_s3_prefix, args.s3_endpoint_url, args.s3_region
        )
    aliases = {}
    for item in args.voice_alias:
        name, sep, voice = item.partition("=")
        if not sep or not name.strip() or not voice.strip():
            raise ValueError(f"--voice-alias wants NAME=VOICE, got {item!r}")
        aliases[name.strip()] = voice.strip()
    return Settings(
        max_text_chars=args.max_text_chars,
        max_instruct_chars=args.max_instruct_chars,
        max_prompt_text_chars=args.max_prompt_text_chars,
        max_json_bytes=None if args.max_json_mb is None else int(args.max_json_mb * 1024 * 1024),
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_prompt_seconds=args.max_prompt_seconds,
        workers=args.workers,
        max_queue=args.max_queue,
        max_voices=args.max_voices,
        prepare_voices=args.prepare_voices,
        storage_waiters=args.storage_waiters,
        request_timeout=args.timeout,
        api_key=args.api_key,  # (an empty one is refused: argparse's _api_key, Settings)
        cors_origins=args.cors_origin,
        allowed_hosts=allowed_hosts(args.host, args.allowed_host, bool(args.api_key)),
        outputs_dir=args.outputs_dir,
        outputs_keep_days=args.outputs_keep_days,
        spool_dir=args.spool_dir,
        s3=s3,
        voice_aliases=aliases,
        docs_public=args.docs_public,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        send_timeout=args.send_timeout,
        keep_alive_timeout=args.keep_alive,
        shutdown_timeout=args.shutdown_timeout,
        **extra,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from ..errors import CosyVoiceError

    # options first: a bad one is an error on stderr before the server's logging is set up,
    # and before torch and uvicorn are imported (seconds)
    check_ray_only_options(args)
    try:
        settings = settings_from_args(args)
    except (ValueError, OverflowError) as exc:  # (--max-upload-mb 1e309: no number of bytes)
        raise CosyVoiceError(f"bad server option: {exc}") from None
    check_s3_client(args)
    if not args.ray:  # (replicas' directories are their machines')
        check_storage_dirs(args, settings)

    import uvicorn

    from ..engine import Engine
    from .app import create_app
    from .logs import configure
    from .server import uvicorn_config

    try:
        if not args.ray:
            from ..cli import set_threads

            set_threads(args.threads)  # once, before the model loads
            Engine.check_load_options(**load_options(args))  # an error now, not a 503 later
            check_load_paths(args)
        else:  # a failed deploy later (every replica retried) is slow and says less
            check_replica_load_options(load_options(args))
    except CosyVoiceError as exc:  # named as the options the user typed
        raise type(exc)(as_flags(str(exc))) from None
    configure(logging.INFO, json_lines=args.log_format == "json")
    if args.ray:
        return cmd_serve_ray(args, settings)

    def load():
        return Engine.load(args.model, **load_options(args))

    app = create_app(load, settings)
    logging.getLogger("cosyvoice_lite.serving").info(
        "serving on http://%s:%d (model loading in the background)", args.host, args.port
    )
    # uvicorn re-raises the SIGINT it handled after stopping: that is a normal stop
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(uvicorn_config(app, settings, args.host, args.port)).run()
    return 0


def load_options(args: argparse.Namespace) -> dict:
    """``Engine.load``'s keywords from the serve options (the model apart)."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "flow_steps": args.flow_steps,
        "variant": args.variant,
        "llm_checkpoint": args.llm_checkpoint,
        "max_batch": args.workers,
        "audio_workers": args.audio_workers,
        "idle_release_seconds": args.idle_release_seconds or None,
        "prompt_cache_mb": args.prompt_cache_mb,
        "stream_cache_mb": args.stream_cache_mb,
        "stream_cache_dtype": args.stream_cache_dtype,
        "backend": args.backend,
        "onnx_dir": args.onnx_dir,
        "exact_float32": args.exact_float32,
        "share_onnx_threads": True,  # a server (or a Ray replica) owns its process
    }


def check_load_paths(args: argparse.Namespace) -> None:
    """The paths the background load reads, checked before the server starts (it reported
    not-ready forever): --model exists or names an official release (downloaded in the
    background), --onnx-dir holds a whole export, and a model directory here (or already
    downloaded) has every file the load reads and takes the options given (--variant, --llm,
    --stream-cache-dtype). (Not for Ray: the replicas' machines have their own files.)"""
    from ..errors import ModelDownloadError
    from ..export.runtime import check_backend_dir
    from ..hub import hub_timeout, resolve_model
    from ..modeldir import check_model_for_load

    hub_timeout()  # a bad $COSYVOICE_LITE_HUB_TIMEOUT: now, not in the background load
    check_model_path(args.model)
    check_backend_dir(args.backend, args.onnx_dir)
    try:
        path = resolve_model(args.model, download=False)
    except ModelDownloadError:  # an official release not downloaded yet: the load fetches it
        return
    check_model_for_load(path, args.variant, args.llm_checkpoint, args.stream_cache_dtype)


# the serve options that make an S3 client (the server's, or with --ray the driver's and
# the replicas'); --s3-prefix, --s3-endpoint-url, --s3-region and --voices-s3-prefix only
# shape the clients these make
S3_CLIENT_OPTIONS = ("s3_bucket", "voices_s3_bucket")


def check_s3_client(args: argparse.Namespace) -> None:
    """A CosyVoiceError naming the S3 option given where boto3 cannot be imported (the app
    made its client later: a RuntimeError in two chained tracebacks, exit status 1)."""
    from ..errors import CosyVoiceError

    given = [name for name in S3_CLIENT_OPTIONS if getattr(args, name, None)]
    if not given:
        return
    try:
        import boto3  # noqa: F401
        from botocore.config import Config  # noqa: F401 - what make_s3_client uses
    except ImportError as exc:
        flag = "--" + given[0].replace("_", "-")
        raise CosyVoiceError(
            f"{flag} needs boto3 (the 's3' extra), which cannot be imported ({exc}): "
            "pip install 'boto3>=1.34'"
        ) from None


def check_storage_dirs(args: argparse.Namespace, settings) -> None:  # noqa: ANN001
    """The directories the server makes and writes are none of them a file, nor under one
    (a bare "[Errno 17] File exists" at start, or a voice library unavailable for good)."""
    from ..errors import CosyVoiceError

    places = []
    if settings.voices_s3 is None:
        from_variable = "$COSYVOICE_LITE_VOICES" if os.environ.get("COSYVOICE_LITE_VOICES") else ""
        places.append((settings.voices_dir, "--voices-dir" if args.voices_dir else from_variable))
    if settings.outputs_dir is not None:
        places.append((settings.outputs_dir, "--outputs-dir"))
    elif settings.s3 is not None:  # results wait in the spool until uploaded
        places.append((settings.spool_dir, "--spool-dir"))
    for path, option in places:
        if (blocker := _not_a_directory(path)) is not None:
            named = f"{option} {str(path)!r}" if option else f"directory {str(path)!r}"
            raise CosyVoiceError(f"{named}: {str(blocker)!r} is a file, not a directory")


def _not_a_directory(path: Path) -> Path | None:
    """The nearest of ``path`` and the folders above it that exists, where it is no directory."""
    for place in (path, *path.parents):
        try:
            if not os.path.lexists(place):
                continue
            return None if place.is_dir() else place
        except OSError:  # (unreadable: the server's own error says more)
            return None
    return None


def check_model_path(model: str) -> None:
    """A ModelDownloadError, as ``hub.resolve_model`` gives, where ``model`` is neither a path
    here nor an official name (``Name`` or ``Org/Name``)."""
    from ..hub import official_name

    if not Path(model).expanduser().exists():
        official_name(model)


def check_replica_load_options(options: dict) -> None:
    """``Engine.check_load_options`` for replicas, in the deploying command: all of them, but
    the presence of a device this machine lacks (the replicas' machines may have it: they check
    it). The quantisation is still checked for that kind of device."""
    import torch

    from ..device import ACCELERATOR_KINDS, available_devices, check_precision, dtype_named
    from ..engine import Engine
    from ..errors import DeviceError

    try:
        Engine.check_load_options(**options)
    except DeviceError:  # the device checks come last: the others passed
        device = str(options.get("device") or "cpu").strip().lower()
        here = available_devices()
        if device.startswith("cpu") or device in here or f"{device}:0" in here:
            raise
        # only an accelerator's name can be another machine's: a typo (gpu, cuda0) is refused
        # on every one, and so is mps (no float64)
        named = re.fullmatch(rf"({'|'.join(ACCELERATOR_KINDS)})(:\d+)?", device)
        if named is None:
            raise
        try:
            kind = torch.device(named.group(1), 0)
        except RuntimeError:  # a back-end this torch lacks (npu, ...): the replicas' torch
            return
        # Engine.load checks the precision after the device's presence: without this, int8 on
        # cuda passed here and every GPU replica refused it. Which dtypes a GPU computes
        # depends on the GPU (bfloat16 from Ampere): the replica's to say, not this machine's.
        dtype = options.get("dtype", "float32")
        check_precision(
            kind, "float32" if dtype_named(dtype) is not None else dtype, options.get("quantize")
        )


def ray_options_from_args(args: argparse.Namespace):
    """The Ray Serve options of ``serve --ray`` (ValueError for bad ones)."""
    from .ray_serve import RayOptions, parse_autoscale

    load = {"model": args.model, **load_options(args)}
    return RayOptions(
        replicas=args.replicas,
        autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
        address=args.ray_address,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        place_timeout=args.place_timeout or None,
        host=args.host,
        port=args.port,
        load=load,
        threads=args.threads,
        log_format=args.log_format,
    )


def cmd_serve_ray(args: argparse.Namespace, settings) -> int:
    """``serve --ray``: the same app on Ray Serve replicas (ray_serve.py)."""
    from ..errors import CosyVoiceError
    from .ray_serve import serve_on_ray

    try:
        options = ray_options_from_args(args)
    except ValueError as exc:
        raise CosyVoiceError(f"bad server option: {exc}") from None
    return serve_on_ray(settings, options)


def _mb_or_none(value: str) -> int | None:
    """MiB (0 or more), or ``none`` for no bound."""
    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MiB (a whole number) or none, got {value!r}") from None


def _host(value: str) -> str:
    """An address to listen on: an empty one listened on every interface."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "an empty address listens on every interface: give 127.0.0.1 (this machine) or "
            "0.0.0.0 (every interface)"
        )
    return value.strip()


def _api_key(value: str) -> str:
    """The API key (of --api-key or its variable): an empty one ran the server without any."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            f"empty API key (--api-key or ${API_KEY_VARIABLE}): leave the option and variable "
            "out to run without one"
        )
    return value


def _directory(value: str) -> Path:
    """A directory option's path: an empty one meant the current directory."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path: give a directory")
    return Path(value)


def _port(value: str) -> int:
    """A TCP port: 0 (any free one) to 65535 (a larger one was bound modulo 65536, silently)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, got {port}")
    return port
