"""``cosyvoice-lite serve``: run the HTTP server (FastAPI on plain uvicorn)."""

from __future__ import annotations

import argparse
import contextlib
import logging
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
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
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
        default=os.environ.get("COSYVOICE_LITE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $COSYVOICE_LITE_API_KEY)",
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
        type=Path,
        help="voice library directory (default $COSYVOICE_LITE_VOICES, else "
        "$XDG_DATA_HOME/cosyvoice-lite/voices, i.e. ~/.local/share/cosyvoice-lite/voices)",
    )
    ops.add_argument("--outputs-dir", type=Path, help="save every result (audio + JSON) here")
    ops.add_argument(
        "--outputs-keep-days",
        type=float,
        help="remove results from --outputs-dir after this many days (a day's folder at a time; "
        "one whose S3 upload is pending is kept); default: keep them all",
    )
    ops.add_argument("--s3-bucket", help="upload every result to this S3 bucket (needs boto3)")
    ops.add_argument("--s3-prefix", default="", help="key prefix inside the bucket")
    ops.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, moto, ...)")
    ops.add_argument("--s3-region", help="S3 region")
    ops.add_argument(
        "--spool-dir",
        type=Path,
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
        "--voices-s3-bucket",
        help="keep the voice library in this S3 bucket, shared by all replicas "
        "(--s3-endpoint-url and --s3-region apply)",
    )
    cluster.add_argument("--voices-s3-prefix", default="", help="key prefix for the voices")


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


def settings_from_args(args: argparse.Namespace):
    from .settings import S3Settings, Settings

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
        max_json_bytes=int(args.max_json_mb * 1024 * 1024) if args.max_json_mb else None,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_prompt_seconds=args.max_prompt_seconds,
        workers=args.workers,
        max_queue=args.max_queue,
        max_voices=args.max_voices,
        prepare_voices=args.prepare_voices,
        storage_waiters=args.storage_waiters,
        request_timeout=args.timeout,
        api_key=args.api_key or None,
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
    import uvicorn

    from ..engine import Engine
    from .app import create_app
    from .logs import configure
    from .server import uvicorn_config

    # options first: a bad one is an error on stderr before the server's logging is set up
    try:
        settings = settings_from_args(args)
    except (ValueError, OverflowError) as exc:  # (--max-upload-mb inf: no number of bytes)
        from ..errors import CosyVoiceError

        raise CosyVoiceError(f"bad server option: {exc}") from None
    if not args.ray:
        from ..cli import set_threads

        set_threads(args.threads)  # once, before the model loads
        Engine.check_load_options(**load_options(args))  # an error now, not a 503 later
        check_load_paths(args)
    else:  # a failed deploy later (every replica retried) is slow and says less
        check_replica_load_options(load_options(args))
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
    """The paths the background load reads first, checked before the server starts (it
    reported not-ready forever): --model exists or names an official release (downloaded in
    the background), and --onnx-dir holds a whole export. (Not for Ray: the replicas' machines
    have their own files.)"""
    from ..export.runtime import check_backend_dir

    check_model_path(args.model)
    check_backend_dir(args.backend, args.onnx_dir)


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


def _port(value: str) -> int:
    """A TCP port: 0 (any free one) to 65535 (a larger one was bound modulo 65536, silently)."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 0 to 65535, got {port}")
    return port
