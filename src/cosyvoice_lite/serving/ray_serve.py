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

Deploying: the cluster is joined only where something answers at its address (ray.init
retried a dead one for minutes), a replica that no node could ever hold is refused before
anything is deployed, and one that no node takes within ``RayOptions.place_timeout`` fails the
deploy (Serve would wait for ever). Each command names itself in its deployment (user_config):
a redeploy by another command replaces the application in place, and the first command then
stops without deleting it.

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
import socket
import sys
import time
import uuid
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
HEALTH_TIMEOUT_S = HEALTH_WAIT + 5.0  # Serve's wait for the probe: past the replica's own
PLACE_TIMEOUT = 120.0  # seconds a deploy waits for a replica to be placed on a node
UNPLACED_STOP_WAIT = 10.0  # a stop's wait for an application none of whose replicas ran
CONNECT_TIMEOUT = 5.0  # seconds for the TCP check of a cluster's address
CLIENT_PORT = 10001  # Ray Client's port when a ray:// address names none
WATCH_PERIOD = 5.0  # how often a running command checks that its application is still its own
CLUSTER_LOST_AFTER = 60.0  # seconds without an answer from Serve before the command gives up
CLAIM_TIMEOUT = 60.0  # seconds for Serve to show a deploy's owner (another deployed meanwhile)
OWNER_KEY = "deployed_by"  # the user_config entry naming the command that deployed
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
    # seconds a deploy waits for its first replica to be placed on a node; None: as long as it
    # takes, and no check of the nodes' sizes (a cluster whose autoscaler adds nodes on demand)
    place_timeout: float | None = PLACE_TIMEOUT
    owner: str | None = None  # the deploying command's id (user_config): see watch_app

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
        if self.place_timeout is not None and not 0 < self.place_timeout < math.inf:
            raise ValueError("the placement timeout must be positive (None: no limit)")


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
    rounded up). No request deadline: Serve's runs over the whole response, so one past
    --timeout also cut a stream made in time whose client plays it in real time (the app
    bounds the computing itself; a hung replica is left to the health probe). The proxy has
    no header deadline nor connection limit: ``unapplied_options``."""
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
        self.deployed_by: str | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's user_config: only the deploying command's id (``RayOptions.owner``), which a
        redeploy changes without restarting replicas whose options are unchanged."""
        self.deployed_by = config.get(OWNER_KEY)

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
        "health_check_timeout_s": HEALTH_TIMEOUT_S,
        "graceful_shutdown_timeout_s": graceful_shutdown_s(settings),
    }
    if options.owner is not None:
        config["user_config"] = {OWNER_KEY: options.owner}
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


def ray_temp_dir(environ: Mapping[str, str]) -> str:
    """Where Ray keeps its files on this machine (as Ray finds it: RAY_TMPDIR, TMPDIR, /tmp)."""
    base = environ.get("RAY_TMPDIR") or (
        environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    )
    return os.path.join(base or "/tmp", "ray")


def cluster_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """What ``ray.init`` gets: the given address, else RAY_ADDRESS (set for a `ray job submit`
    entrypoint), else "local", a new cluster here as documented (``ray.init(None)`` joins the
    cluster last recorded by `ray start`, and retried its address for 14 minutes when that
    cluster had crashed)."""
    environ = os.environ if environ is None else environ
    return address or environ.get("RAY_ADDRESS") or "local"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host[:port]``; None for what has no port."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    rest = rest.split("/", 1)[0]
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        return (rest.strip("[]"), CLIENT_PORT) if scheme == "ray" and rest else None
    return host.strip("[]"), int(port)


def check_reachable(address: str, environ: Mapping[str, str] | None = None) -> None:
    """Fail at once (CosyVoiceError) when nothing listens at the cluster's address: ray.init
    retried a dead one for about 14 minutes. For "auto", the address `ray start` recorded."""
    environ = os.environ if environ is None else environ
    recorded = None
    if address == "local":
        return
    if address == "auto":
        recorded = os.path.join(ray_temp_dir(environ), "ray_current_cluster")
        try:
            with open(recorded) as file:
                address = file.read().strip()
        except OSError:
            return  # Ray looks for a running cluster itself, and says when it finds none
    target = _host_port(address)
    if target is None:
        return  # Ray names what is wrong with it
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT).close()
    except OSError:
        where = f"{target[0]}:{target[1]}"
        if recorded is not None:
            raise CosyVoiceError(
                f"no Ray cluster answers at {where}, the address `ray start` recorded in "
                f"{recorded}: that cluster has stopped or crashed (`ray stop` clears the "
                "record; start it again with `ray start --head`)"
            ) from None
        raise CosyVoiceError(
            f"no Ray cluster answers at {where} (is `ray start` running there?)"
        ) from None


def _connect_failed(address: str, exc: BaseException, environ: Mapping[str, str]) -> str:
    """ray.init's ConnectionError as a line, with the likely cause Ray only logs: since Ray
    2.60 `ray start` turns on token authentication, and Ray sends its token on its own only
    to a cluster it finds ("auto"), never to an address given (which could be anyone's)."""
    message = f"could not connect to the Ray cluster at {address}: {exc}"
    if address not in ("auto", "local") and not environ.get("RAY_AUTH_MODE"):
        message += (
            " (a cluster with token authentication, `ray start`'s default, refuses a command "
            "without its token: set RAY_AUTH_MODE=token, with the cluster's token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN, or use --ray-address auto on its head node)"
        )
    return message


def _format_resources(resources: Mapping[str, float]) -> str:
    shown = []
    for name, amount in resources.items():
        if name == "memory":
            shown.append(f"memory {amount / 2**30:.3g} GiB")
        else:
            shown.append(f"{name} {amount:g}")
    return ", ".join(shown) or "nothing"


def unplaceable(actor: Mapping[str, Any], nodes: list[dict[str, Any]]) -> str | None:
    """Why no node of the cluster (``ray.nodes()``) could ever hold one replica of these
    ``ray_actor_options``, or None. Serve would wait for ever for a node that fits."""
    wanted = {
        name: float(actor.get(key) or 0)
        for name, key in (("CPU", "num_cpus"), ("GPU", "num_gpus"), ("memory", "memory"))
    }
    asked = {name: amount for name, amount in wanted.items() if amount > 0}
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    if not asked or any(
        all(node.get(name, 0) >= amount for name, amount in asked.items()) for node in alive
    ):
        return None
    if "memory" not in asked:  # CPU and GPU shown always: the options' two figures
        del wanted["memory"]
    have = [
        "{" + _format_resources({name: node.get(name, 0) for name in wanted}) + "}"
        for node in alive[:8]
    ]
    more = f" and {len(alive) - 8} more" if len(alive) > 8 else ""
    return (
        f"no node of the Ray cluster can hold a replica: a replica needs "
        f"{_format_resources(wanted)} (--replica-cpus, --replica-gpus), the cluster's "
        f"{len(alive)} node(s) have {', '.join(have) or 'none'}{more} in all"
    )


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


class AppLost(CosyVoiceError):
    """The command's application was deleted or redeployed by someone else: not the command's
    to delete any more."""


@dataclass
class AppState:
    """What a command knows of the application it deployed."""

    name: str
    owner: str | None  # RayOptions.owner: None, not checked
    ran: bool = False  # a replica of it has run (and may run requests: a stop waits for them)
    claimed: bool = False  # Serve has shown the owner: until then it may show the one before


def app_owner(app_name: str) -> str | None:
    """The id of the command that deployed the application last (its user_config), or None
    (deployed otherwise: a Serve config, an older cosyvoice-lite)."""
    from ray.serve.context import _get_global_client  # as start_serve: Serve's controller

    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name) or {}
    for deployment in (app.get("deployments") or {}).values():
        config = (deployment.get("deployment_config") or {}).get("user_config") or {}
        if OWNER_KEY in config:
            return config[OWNER_KEY]
    return None


def _replicas_running(app) -> int:
    return sum(
        count
        for deployment in app.deployments.values()
        for replica_state, count in deployment.replica_states.items()
        if replica_state == "RUNNING"
    )


def own_app(state: AppState):
    """The application's status in Serve, updating ``state.ran``; AppLost when it is gone or
    another command has deployed it since (a redeploy replaces it in place, under its name)."""
    from ray import serve

    app = serve.status().applications.get(state.name)
    if app is None:
        raise AppLost(
            f"application {state.name!r} was deleted by someone else (`serve delete`, "
            "`serve shutdown`, another command): stopping"
        )
    if state.owner is not None:
        # Serve applies a deploy in its control loop: the previous owner shows for a moment
        mine = app_owner(state.name) == state.owner
        if state.claimed and not mine:
            raise AppLost(
                f"application {state.name!r} was deployed again by another command, which now "
                "owns it: stopping, and leaving it running"
            )
        state.claimed = state.claimed or mine
    state.ran = state.ran or (state.claimed or state.owner is None) and _replicas_running(app) > 0
    return app


def _kill_replicas(app_name: str) -> None:
    """Kill the replica actors of a deleted application none of whose replicas ran: Serve
    waited graceful_shutdown_s (310 s by default) for a replica that was never placed."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#"):
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                ray.kill(handle, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - gone already; Serve stops it anyway
                log.debug("could not kill %s: %s", actor["name"], exc)


def delete_app(app_name: str, wait: float, *, owner: str | None = None, ran: bool = True) -> None:
    """Delete the application and wait (up to ``wait`` seconds) until its replicas are gone:
    they first finish their requests. (``serve.delete`` alone gives up after 60 s, and a
    cluster started here would then be shut down under the requests still running.) With an
    ``owner``, only while that command's deployment is the one running; without ``ran`` (no
    replica ever ran: none has requests) its replicas are killed at once."""
    from ray import serve

    if owner is not None and app_owner(app_name) != owner:
        log.warning("application %r was deployed by another command since: left running", app_name)
        return
    serve.delete(app_name, _blocking=False)
    if not ran:
        wait = min(wait, UNPLACED_STOP_WAIT)
    deadline = time.monotonic() + wait
    while app_name in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
        if not ran:  # (again: one killed before Serve took the deletion is started anew)
            _kill_replicas(app_name)


class DeployFailed(RuntimeError):
    """Why the application did not come up, in a line."""


def wait_deployed(state: AppState, place_timeout: float | None) -> None:
    """Until the application runs. DeployFailed: it failed (a replica's error), or no replica
    was placed on a node within ``place_timeout`` seconds (Serve would wait for ever; its
    message names the resources wanted and those free). Some replicas placed by then: a
    warning, and it serves with those (Serve places the others when it can)."""
    started = time.monotonic()
    while True:
        app = own_app(state)
        if state.owner is not None and not state.claimed:
            if time.monotonic() - started > CLAIM_TIMEOUT:
                raise AppLost(
                    f"application {state.name!r} was deployed again by another command while "
                    "this one deployed it: stopping, and leaving it running"
                )
            time.sleep(0.2)
            continue
        if app.status == "RUNNING":
            return
        if app.status == "DEPLOY_FAILED":
            raise DeployFailed(_failure(state.name) or app.message)
        # Serve says so after 30 s (and every 30 s), distinct from a replica still loading
        waiting = [
            d.message for d in app.deployments.values() if "to be scheduled" in (d.message or "")
        ]
        if waiting and place_timeout is not None and time.monotonic() - started > place_timeout:
            if state.ran:
                log.warning("serving with the replicas placed so far: %s", waiting[0])
                return
            raise DeployFailed(
                f"no replica could be placed on the cluster within {place_timeout:g} s: "
                f"{waiting[0]}"
            )
        time.sleep(1.0)


def check_placeable(options: RayOptions) -> None:
    """A CosyVoiceError when no node of the cluster could ever hold one replica (unless
    ``options.place_timeout`` is None: a cluster that adds nodes on demand)."""
    import ray

    if options.place_timeout is not None:
        actor = {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus}
        reason = unplaceable(actor, ray.nodes())
        if reason is not None:
            raise CosyVoiceError(f"deploying on Ray Serve failed: {reason}")


def deploy(application, options: RayOptions, state: AppState | None = None) -> AppState:
    """Deploy (without blocking) and wait until the application runs, or a CosyVoiceError
    naming why it failed, with the failed application deleted (Serve would keep it, retrying,
    until someone deletes it). A replica no node of the cluster can hold fails before
    deploying, unless ``options.place_timeout`` is None (a cluster that adds nodes)."""
    from ray import serve

    state = state or AppState(options.app_name, options.owner)
    check_placeable(options)
    try:
        target = serve.RunTarget(
            target=application, name=options.app_name, route_prefix=options.route_prefix
        )
        serve.run_many([target], wait_for_applications_running=False)
        wait_deployed(state, options.place_timeout)
    except AppLost:
        raise  # another command's now: not this one's to delete
    except Exception as exc:  # noqa: BLE001 - Serve's RuntimeError, or any error of the cluster
        try:
            reason = str(exc) if isinstance(exc, DeployFailed) else _failure(options.app_name)
        except Exception:  # noqa: BLE001 - the cluster may be what failed
            reason = ""
        reason = reason or str(exc)
        try:
            # a failed deploy runs no request
            delete_app(options.app_name, 60.0, owner=options.owner, ran=state.ran)
        except Exception as cleanup:  # noqa: BLE001 - reported, the deploy error is the one
            log.warning("could not delete the failed application: %s", cleanup)
        raise CosyVoiceError(
            f"deploying on Ray Serve failed (application {options.app_name!r} deleted): {reason}"
        ) from None
    return state


def watch_app(state: AppState) -> None:
    """Run until interrupted; AppLost when the application is deleted or redeployed by someone
    else (the command had gone on silently, and its stop deleted the other one's), a
    CosyVoiceError when Serve no longer answers for CLUSTER_LOST_AFTER seconds."""
    failing_since = None
    while True:
        time.sleep(WATCH_PERIOD)
        try:
            own_app(state)
            failing_since = None
        except AppLost:
            raise
        except Exception as exc:  # noqa: BLE001 - the cluster's: retried, then given up
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > CLUSTER_LOST_AFTER:
                raise CosyVoiceError(
                    f"Ray Serve has not answered for {CLUSTER_LOST_AFTER:g} s: {exc}"
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
    or SIGTERM: the application is deleted, its replicas finish their requests, exit 0), or
    until another command redeploys or deletes the application (a CosyVoiceError)."""
    try:
        import ray
        from ray import serve  # noqa: F401 - the extra's part used below
    except ImportError as exc:
        raise CosyVoiceError(
            "--ray needs Ray Serve (the 'ray' extra): pip install 'ray[serve]>=2.60'"
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
    address = cluster_address(options.address)
    check_reachable(address)
    env = replica_env()
    # the command's id in its deployment: its stop deletes the application only while it is
    # still its own (a redeploy by another command replaces it in place, under the same name)
    owner = options.owner or uuid.uuid4().hex[:12]
    options = dataclasses.replace(options, env_vars={**env, **options.env_vars}, owner=owner)
    if env:  # names only: values may be secrets
        log.info("passing to the replicas: %s", ", ".join(sorted(env)))
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except SystemExit as exc:  # Ray's own SIGTERM handler while it starts (sys.exit(15))
        if exc.code != signal.SIGTERM:
            raise
        log.info("stopping before the deploy (SIGTERM while Ray was starting)")
        ray.shutdown()  # what it had started of a cluster of its own
        return 0
    except ConnectionError as exc:
        raise CosyVoiceError(_connect_failed(address, exc, os.environ)) from None
    _stop_on_sigterm()  # after ray.init, which installs its own handler
    state = AppState(options.app_name, owner)
    deployed = False
    try:
        check_placeable(options)  # before Serve is started for nothing
        host, port = start_serve(settings, options)
        deployed = True
        try:
            deploy(build_application(settings, options), options, state)
        except CosyVoiceError:
            deployed = False  # deploy deleted it, or it is another command's now
            raise
        log.info("serving on http://%s:%d through Ray Serve", host, port)
        watch_app(state)
    except AppLost:
        deployed = False
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Stopped)
        if state.ran:
            log.info(
                "stopping: the replicas finish their requests (up to %g s)",
                graceful_shutdown_s(settings),
            )
        else:
            log.info("stopping: no replica has run yet")
    finally:
        try:
            if deployed:
                wait = graceful_shutdown_s(settings) + 30.0 if state.ran else UNPLACED_STOP_WAIT
                delete_app(options.app_name, wait, owner=owner, ran=state.ran)
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone; the stop goes on
            log.warning("could not delete application %r: %s", options.app_name, exc)
        finally:
            ray.shutdown()
    return 0
