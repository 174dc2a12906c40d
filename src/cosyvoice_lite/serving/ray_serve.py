"""``cosyvoice-lite serve --ray``: the same FastAPI app as a Ray Serve deployment.

Every replica is one process (a Ray actor) that loads the model once, in its constructor, and
then runs the app of ``create_app`` (its own engine loop, queue and metrics) as the Serve
ingress. Serve's HTTP proxy spreads requests over the replicas; a replica receives requests only
once its model is loaded and warm (``Engine.wait_until_warm``), so ``/ready`` through the proxy
answers 200 exactly when at least one replica has its model. Replicas are fixed (``--replicas N``) or autoscaled on ongoing requests
per replica (``--autoscale MIN:MAX``, aiming at one engine batch per replica).

Backpressure: Serve sends a replica up to its admission (batch + queue) plus a little room for
health checks and voice reads, so a request beyond a replica's admission reaches it and gets the
app's own JSON 429 (``Retry-After``) at once, as from the plain server: requests do not wait in
the proxy for a replica to free up. A proxy holds a request only while its router picks a
replica; as many as all replicas hold may be held so (``max_queued_requests``), so that a burst
is routed and answered by the replicas; beyond that Serve answers its own plain-text 429. Each
response names its replica (``X-Replica``), and ``/metrics`` labels every sample with
``replica``. A replica that dies fails its in-flight requests (5xx or a cut stream); Serve sends
later requests to the living replicas and starts a new one. A replica that is stopped
(scale-down, redeploy, delete) first finishes the requests it runs (``graceful_shutdown_s``).

Environment: replicas run in worker processes of the cluster's nodes, which do not see the
environment of the command that deploys; ``serve_on_ray`` passes the variables the engine and
the voice storage read (``replica_env``: S3 credentials, the model cache, the hub) to them.

Voices: with several replicas, keep the library in a bucket (``Settings.voices_s3``) so that a
voice created through one replica is usable through all; a local directory works only while all
replicas share one file system.

Ray is the optional ``ray`` extra (``pip install -e '.[ray]'`` in a checkout), imported only
here, and only when this mode is used.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CosyVoiceError
from .settings import Settings

log = logging.getLogger("cosyvoice_lite.serving.ray")

APP_NAME = "cosyvoice"
DEPLOYMENT_NAME = "CosyVoice"
REPLICA_HEADER = "x-replica"
HEALTH_WAIT = 20.0  # seconds the engine loop may take to answer Serve's health probe
HEALTH_ROOM = 4  # requests beyond the admission Serve may send: /health, /metrics, voice reads
# environment variables of the deploying command that replicas need (boto3's credentials and
# settings, the model cache and hub, proxies for downloads): prefixes and exact names
REPLICA_ENV_PREFIXES = ("AWS_", "COSYVOICE_LITE_", "HF_", "HUGGINGFACE_", "MODELSCOPE_")
REPLICA_ENV_NAMES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)


@dataclass
class RayOptions:
    """How the deployment runs on the cluster."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: fixed ``replicas``
    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None: local
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    host: str = "127.0.0.1"  # where Serve's HTTP proxy listens
    port: int = 8000
    health_check_period_s: float = 5.0
    load: dict[str, Any] = field(default_factory=dict)  # Engine.load arguments (model, ...)
    threads: int | None = None  # torch CPU threads per replica (None: its CPUs, at least 1)
    # set in every replica's process (Ray's runtime_env); secrets among them: not in the repr
    env_vars: dict[str, str] = field(default_factory=dict, repr=False)
    log_format: str = "json"  # the replicas' log lines: "json" or "text" (--log-format)
    app_name: str = APP_NAME
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.autoscale is not None:
            low, high = self.autoscale
            if low < 0 or high < 1 or low > high:
                raise ValueError("--autoscale wants MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must not be negative")
        # refused here, as set_threads does without --ray: in the replicas it failed every one
        # (a slow, retried deploy), and 0 was taken as "unset"; the upper bound is 4 per core of
        # the replica's machine, which only the replica knows
        if self.threads is not None and self.threads < 1:
            raise ValueError(
                f"--threads must be from 1 to 4 per core of a replica's machine, got {self.threads}"
            )


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` (e.g. ``1:4``) as two integers."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"--autoscale wants MIN:MAX (e.g. 1:4), got {text!r}") from None


def replica_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default: this process's) that replicas need: on a cluster
    started elsewhere (``ray start``, KubeRay) they do not inherit the deploying command's."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if name.startswith(REPLICA_ENV_PREFIXES) or name in REPLICA_ENV_NAMES
    }


def http_options(settings: Settings) -> dict[str, Any]:
    """What Serve's HTTP proxy takes of the connection settings: the keep-alive (whole seconds,
    rounded up). The proxy has no header deadline nor connection limit: ``unapplied_options``."""
    return {"keep_alive_timeout_s": max(1, math.ceil(settings.keep_alive_timeout))}


def unapplied_options(settings: Settings) -> list[str]:
    """Warnings for connection options given (not their defaults) that Serve's proxy cannot
    apply; ``--body-timeout`` is the app's, and applies."""
    defaults = Settings(voices_dir=settings.voices_dir)
    found = []
    if settings.header_timeout != defaults.header_timeout:
        found.append(
            "--header-timeout is not applied under --ray: Serve's HTTP proxy has no deadline "
            "for the request headers (put a proxy with one in front: docs/DEPLOYMENT.md)"
        )
    if settings.send_timeout != defaults.send_timeout:
        found.append(
            "--send-timeout is not applied under --ray: Serve's HTTP proxy writes the responses "
            "(put a proxy with a send timeout in front: docs/DEPLOYMENT.md)"
        )
    if settings.max_connections != defaults.max_connections:
        found.append(
            "--max-connections is not applied under --ray: Serve's HTTP proxy has no "
            "connection limit (replicas bound their requests by --max-batch + --max-queue)"
        )
    if settings.keep_alive_timeout != math.ceil(settings.keep_alive_timeout):
        found.append(
            f"--keep-alive {settings.keep_alive_timeout:g} is rounded up to "
            f"{math.ceil(settings.keep_alive_timeout)} s under --ray (Serve takes whole seconds)"
        )
    return found


def graceful_shutdown_s(settings: Settings) -> float:
    """How long a stopped replica may take: its running requests (at most the request timeout
    each), then the app's own stop (uploads, at most the shutdown timeout). Serve kills the
    replica after that, cutting whatever still runs."""
    return settings.request_timeout + settings.shutdown_timeout


def label_samples(text: str, replica: str) -> str:
    """Prometheus text with ``replica="<replica>"`` added to every sample."""
    label = f'replica="{replica}"'
    lines = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            # a metric name holds neither '{' nor ' ': the first of them ends it
            brace, space = line.find("{"), line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                line = f"{line[: brace + 1]}{label},{line[brace + 1 :]}"
            elif space != -1:
                line = f"{line[:space]}{{{label}}}{line[space:]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _proxied_request_id(headers, given: bytes) -> list:
    """The response headers without the app's ``X-Request-Id`` where it is the proxy's (the
    proxy adds it once); an id of the app's own (the proxy's had characters or a length the app
    does not keep: it names result files) is kept as ``X-Replica-Request-Id``."""
    kept = []
    for key, value in headers:
        if key.lower() == b"x-request-id":
            if value == given:
                continue
            key = b"x-replica-request-id"
        kept.append((key, value))
    return kept


def _disconnect_on_cancel(receive):
    """Serve's proxy tells a replica that the client went away by raising from ``receive`` (a
    ``TaskCancelledError``): it is a disconnect, which the app handles (the row is cancelled),
    not an error to log with a traceback. (Used in replicas only, where Ray is installed.)"""
    from ray.exceptions import TaskCancelledError

    async def received() -> dict:
        try:
            return await receive()
        except TaskCancelledError:
            return {"type": "http.disconnect"}

    return received


class ReplicaLabel:
    """ASGI middleware: ``X-Replica`` on every response, the replica label on /metrics. Serve's
    proxy gives every request an id (the client's, or a UUID), which the app takes as its own,
    and adds it to the response: the app's copy is left out (``_proxied_request_id``)."""

    def __init__(self, app, replica: str) -> None:
        from .guard import CANCEL_IS_DISCONNECT, app_path

        self.app, self.replica, self.app_path = app, replica, app_path
        self.cancel_is_disconnect = CANCEL_IS_DISCONNECT
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = _disconnect_on_cancel(receive)
        # Serve cancels a request's task when its client goes away: not a shutdown (guard.py)
        scope.setdefault("state", {})[self.cancel_is_disconnect] = True
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        if self.app_path(scope) != "/metrics":  # (under a route prefix too)

            async def send_named(message) -> None:
                if message["type"] == "http.response.start":
                    headers = [*_proxied_request_id(message.get("headers", []), given), self.header]
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, send_named)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def send_labelled(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    body = b"".join(chunks)
                    if start["status"] == 200:
                        body = label_samples(body.decode(), self.replica).encode()
                    headers = [
                        (k, v)
                        for k, v in _proxied_request_id(start.get("headers", []), given)
                        if k.lower() != b"content-length"
                    ]
                    headers += [(b"content-length", str(len(body)).encode()), self.header]
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, send_labelled)


class ReplicaServer:
    """One replica: the model loaded and warmed up once (before Serve sends it anything), then
    the app."""

    def __init__(
        self,
        settings: Settings,
        load: dict[str, Any],
        threads: int | None,
        log_format: str = "json",
    ) -> None:
        from ..cli import set_threads
        from ..engine import Engine
        from .app import WARM_UP_SECONDS, create_app
        from .logs import configure

        # a Ray worker's root logger has no handler: the app's INFO records (its access log)
        # would be dropped; they go to the worker's stderr (its log file, and the driver's)
        configure(logging.INFO, json_lines=log_format == "json")
        set_threads(threads)
        started = time.perf_counter()
        self.engine = Engine.load(**load)
        # warm before Serve routes to it (its first requests would wait for the traces anyway)
        if not self.engine.wait_until_warm(WARM_UP_SECONDS):
            log.warning("replica still warming up after %d s; serving", WARM_UP_SECONDS)
        self.server_app = create_app(self.engine, settings)  # not .app: Serve owns that
        log.info("replica ready in %.1f s", time.perf_counter() - started)

    def __serve_build_asgi_app__(self):
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
        return ReplicaLabel(self.server_app, replica)

    async def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine loop no longer answers is replaced."""
        await asyncio.wait_for(asyncio.wrap_future(self.engine.call(lambda: None)), HEALTH_WAIT)


def most_replicas(options: RayOptions) -> int:
    """The replicas the deployment may have at most."""
    return options.replicas if options.autoscale is None else max(1, options.autoscale[1])


def deployment_options(settings: Settings, options: RayOptions) -> dict[str, Any]:
    """Serve deployment options for these settings (see the module docstring)."""
    admission = settings.workers + settings.max_queue
    actor: dict[str, Any] = {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus}
    if options.env_vars:
        actor["runtime_env"] = {"env_vars": dict(options.env_vars)}
    config: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        # a request beyond the admission reaches the replica, which answers its JSON 429 at
        # once; the room is for /health, /metrics and voice reads next to a full admission
        "max_ongoing_requests": admission + HEALTH_ROOM,
        # requests wait in a proxy only until the router picks a replica (a few ms, longer when
        # every replica has admission + room): a burst up to what all replicas hold is routed
        # (then answered by the app), beyond it Serve answers its own 429 at once
        "max_queued_requests": most_replicas(options) * (admission + HEALTH_ROOM),
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "health_check_period_s": options.health_check_period_s,
        "graceful_shutdown_timeout_s": graceful_shutdown_s(settings),
    }
    if options.autoscale is None:
        config["num_replicas"] = options.replicas
    else:
        low, high = options.autoscale
        config["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": settings.workers,  # one full engine batch per replica
        }
    return config


def build_application(settings: Settings, options: RayOptions):
    """The bound Serve application (``serve.run`` it, or use it from a Serve config)."""
    from ray import serve

    threads = options.threads if options.threads is not None else max(1, int(options.replica_cpus))
    ingress = serve.ingress()(ReplicaServer)
    deployment = serve.deployment(ingress, **deployment_options(settings, options))
    return deployment.bind(settings, options.load, threads, options.log_format)


class _ArgsParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of exiting: in Serve's build task a SystemExit
    kills the worker, and the reason (argparse's message on its stderr) is lost."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def app_builder(args: dict[str, Any]):
    """The application for a Serve config file (``serve run``, KubeRay's RayService):
    ``import_path: cosyvoice_lite.serving.ray_serve:app_builder`` with ``args`` holding options
    of ``cosyvoice-lite serve`` by name (``model``, ``replicas`` or ``autoscale``,
    ``replica_cpus``, ``voices_s3_bucket``, ``max_queue``, ...; ``true`` for a flag). The HTTP
    address is the config's ``http_options``. A bad option raises ValueError (its message is the
    application's status in Serve)."""
    from .cli import add_serve_command, ray_options_from_args, settings_from_args

    parser = _ArgsParser(prog="cosyvoice-lite")
    add_serve_command(parser.add_subparsers())
    argv = ["serve", "--ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                argv.append(flag)
            elif item is not False and item is not None:
                argv += [flag, str(item)]
    try:
        options = parser.parse_args(argv)
    except ValueError as exc:
        raise ValueError(f"cosyvoice-lite application args: {exc}") from None
    settings = settings_from_args(options)
    for message in unapplied_options(settings):
        if not message.startswith("--keep-alive"):  # the config's http_options set that
            log.warning("%s", message.replace("under --ray", "on Ray Serve"))
    return build_application(settings, ray_options_from_args(options))


def check_voice_store(settings: Settings) -> None:
    """Fail before deploying when a voice bucket cannot be reached (StorageError naming it)."""
    if settings.voices_s3 is not None:
        from .voice_store_s3 import S3VoiceStore

        S3VoiceStore(settings.voices_s3).open()


def start_serve(settings: Settings, options: RayOptions) -> tuple[str, int]:
    """Start Serve's HTTP proxy at ``options.host:port``, or check the one already running on
    the cluster: its address cannot change while Serve runs (Serve would ignore the new one
    silently), so a different one is a CosyVoiceError. The address served, as (host, port)."""
    from ray import serve
    from ray.serve.context import _get_global_client  # Serve's own way to find its controller

    wanted = {"host": options.host, "port": options.port, **http_options(settings)}
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options=wanted)
        return options.host, options.port
    running = client.http_config
    if (running.host, running.port) != (options.host, options.port):
        raise CosyVoiceError(
            f"Ray Serve already runs on this cluster with its HTTP proxy at "
            f"{running.host}:{running.port}, not the --host {options.host} --port "
            f"{options.port} asked for; Serve cannot move it while it runs: deploy with "
            f"--host {running.host} --port {running.port}, or stop Serve first "
            "(`serve shutdown`, which deletes every application on the cluster)"
        )
    if running.keep_alive_timeout_s != wanted["keep_alive_timeout_s"]:
        log.warning(
            "Ray Serve already runs on this cluster with a keep-alive of %s s: --keep-alive is "
            "not applied",
            running.keep_alive_timeout_s,
        )
    return running.host, running.port


def _failure(app_name: str) -> str:
    """Why an application failed to deploy, in a line: the last line of its deployment's
    message (the replica's exception), else of the application's message."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return ""
    messages = [d.message for d in app.deployments.values()] + [app.message]
    for message in messages:
        lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def delete_app(app_name: str, wait: float) -> None:
    """Delete the application and wait (up to ``wait`` seconds) until its replicas are gone:
    they first finish their requests. (``serve.delete`` alone gives up after 60 s, and a
    cluster started here would then be shut down under the requests still running.)"""
    from ray import serve

    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + wait
    while app_name in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)


def deploy(application, options: RayOptions) -> None:
    """``serve.run``, or a CosyVoiceError naming why it failed, with the failed application
    deleted (Serve would keep it, retrying, until someone deletes it)."""
    from ray import serve

    try:
        serve.run(application, name=options.app_name, route_prefix=options.route_prefix)
    except Exception as exc:  # noqa: BLE001 - Serve's RuntimeError, or any error of the cluster
        try:
            reason = _failure(options.app_name) or str(exc)
        except Exception:  # noqa: BLE001 - the cluster may be what failed
            reason = str(exc)
        try:
            delete_app(options.app_name, 60.0)  # a failed deploy runs no request
        except Exception as cleanup:  # noqa: BLE001 - reported, the deploy error is the one
            log.warning("could not delete the failed application: %s", cleanup)
        raise CosyVoiceError(
            f"deploying on Ray Serve failed (application {options.app_name!r} deleted): {reason}"
        ) from None


class Stopped(KeyboardInterrupt):
    """SIGTERM, as an interrupt: the same orderly stop as Ctrl-C."""


def _stop_on_sigterm() -> None:
    """Ray's driver turns SIGTERM into an abort (exit -6, no cleanup): a stop instead."""

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; the next would cut it short
        raise Stopped

    signal.signal(signal.SIGTERM, stop)


def serve_on_ray(settings: Settings, options: RayOptions) -> int:
    """Connect to (or start) a Ray cluster, deploy, and keep running until interrupted (Ctrl-C
    or SIGTERM: the application is deleted, its replicas finish their requests, exit 0)."""
    try:
        import ray
        from ray import serve  # noqa: F401 - the extra's part used below
    except ImportError as exc:
        raise CosyVoiceError(
            "--ray needs Ray Serve (the 'ray' extra): pip install -e '.[ray]'"
        ) from exc
    check_voice_store(settings)
    if settings.voices_s3 is None and (options.replicas > 1 or options.autoscale):
        log.warning(
            "voices are kept in %s on each machine: use --voices-s3-bucket so that "
            "every replica sees every voice",
            settings.voices_dir,
        )
    for message in unapplied_options(settings):
        log.warning("%s", message)
    env = replica_env()
    options = dataclasses.replace(options, env_vars={**env, **options.env_vars})
    if env:  # names only: values may be secrets
        log.info("passing to the replicas: %s", ", ".join(sorted(env)))
    try:
        ray.init(address=options.address, logging_level=logging.WARNING)
    except SystemExit as exc:  # Ray's own SIGTERM handler while it starts (sys.exit(15))
        if exc.code != signal.SIGTERM:
            raise
        log.info("stopping before the deploy (SIGTERM while Ray was starting)")
        ray.shutdown()  # what it had started of a cluster of its own
        return 0
    _stop_on_sigterm()  # after ray.init, which installs its own handler
    deployed = False
    try:
        host, port = start_serve(settings, options)
        deployed = True
        try:
            deploy(build_application(settings, options), options)
        except CosyVoiceError:
            deployed = False  # deploy deleted it
            raise
        log.info("serving on http://%s:%d through Ray Serve", host, port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Stopped)
        log.info(
            "stopping: the replicas finish their requests (up to %g s)",
            graceful_shutdown_s(settings),
        )
    finally:
        try:
            if deployed:
                delete_app(options.app_name, graceful_shutdown_s(settings) + 30.0)
        finally:
            ray.shutdown()
    return 0
