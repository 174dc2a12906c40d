"""``cosyvoice-lite serve --ray``: the same FastAPI app as a Ray Serve deployment.

Every replica is one process (a Ray actor) that loads the model once, in its constructor, and
then runs the app of ``create_app`` (its own engine loop, queue and metrics) as the Serve
ingress. Serve's HTTP proxy spreads requests over the replicas; a replica receives requests only
once its model is loaded and warm (``Engine.wait_until_warm``), so ``/ready`` through the proxy
answers 200 exactly when at least one replica has its model. Replicas are fixed (``--replicas N``) or autoscaled on ongoing requests
per replica (``--autoscale MIN:MAX``, aiming at one engine batch per replica).

Backpressure: Serve sends a replica at most its admission (batch + queue) plus a little room for
health checks and voice reads, so a full replica answers the app's own JSON 429; requests that
find every replica full wait in the proxy's bounded queue, beyond which the proxy answers 429
too. Each response names its replica (``X-Replica``), and ``/metrics`` labels every sample with
``replica``. A replica that dies fails its in-flight requests (5xx or a cut stream); Serve sends
later requests to the living replicas and starts a new one.

Voices: with several replicas, keep the library in a bucket (``Settings.voices_s3``) so that a
voice created through one replica is usable through all; a local directory works only while all
replicas share one file system.

Ray is the optional ``ray`` extra (``pip install -e '.[ray]'`` in a checkout), imported only
here, and only when this mode is used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .settings import Settings

log = logging.getLogger("cosyvoice_lite.serving.ray")

APP_NAME = "cosyvoice"
DEPLOYMENT_NAME = "CosyVoice"
REPLICA_HEADER = "x-replica"
HEALTH_WAIT = 20.0  # seconds the engine loop may take to answer Serve's health probe
HEALTH_ROOM = 4  # requests beyond the admission Serve may send: /health, /metrics, voice reads


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

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.autoscale is not None:
            low, high = self.autoscale
            if low < 0 or high < 1 or low > high:
                raise ValueError("--autoscale wants MIN:MAX with 0 <= MIN <= MAX and MAX >= 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must not be negative")


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` (e.g. ``1:4``) as two integers."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"--autoscale wants MIN:MAX (e.g. 1:4), got {text!r}") from None


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
        self.app, self.replica = app, replica
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = _disconnect_on_cancel(receive)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        if scope["path"] != "/metrics":

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

    def __init__(self, settings: Settings, load: dict[str, Any], threads: int | None) -> None:
        from ..cli import set_threads
        from ..engine import Engine
        from .app import WARM_UP_SECONDS, create_app

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


def deployment_options(settings: Settings, options: RayOptions) -> dict[str, Any]:
    """Serve deployment options for these settings (see the module docstring)."""
    admission = settings.workers + settings.max_queue
    config: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        "max_ongoing_requests": admission + HEALTH_ROOM,
        "max_queued_requests": admission,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "health_check_period_s": options.health_check_period_s,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
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

    threads = options.threads or max(1, int(options.replica_cpus))
    ingress = serve.ingress()(ReplicaServer)
    deployment = serve.deployment(ingress, **deployment_options(settings, options))
    return deployment.bind(settings, options.load, threads)


def app_builder(args: dict[str, Any]):
    """The application for a Serve config file (``serve run``, KubeRay's RayService):
    ``import_path: cosyvoice_lite.serving.ray_serve:app_builder`` with ``args`` holding options
    of ``cosyvoice-lite serve`` by name (``model``, ``replicas`` or ``autoscale``,
    ``replica_cpus``, ``voices_s3_bucket``, ``max_queue``, ...; ``true`` for a flag). The HTTP
    address is the config's ``http_options``."""
    import argparse

    from .cli import add_serve_command, ray_options_from_args, settings_from_args

    parser = argparse.ArgumentParser(prog="cosyvoice-lite")
    add_serve_command(parser.add_subparsers())
    argv = ["serve", "--ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                argv.append(flag)
            elif item is not False and item is not None:
                argv += [flag, str(item)]
    options = parser.parse_args(argv)
    return build_application(settings_from_args(options), ray_options_from_args(options))


def check_voice_store(settings: Settings) -> None:
    """Fail before deploying when a voice bucket cannot be reached (StorageError naming it)."""
    if settings.voices_s3 is not None:
        from .voice_store_s3 import S3VoiceStore

        S3VoiceStore(settings.voices_s3).open()


def serve_on_ray(settings: Settings, options: RayOptions) -> int:
    """Connect to (or start) a Ray cluster, deploy, and keep running until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        from ..errors import CosyVoiceError

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
    ray.init(address=options.address, logging_level=logging.WARNING)
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
    log.info("serving on http://%s:%d through Ray Serve", options.host, options.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        serve.delete(APP_NAME)
    return 0
