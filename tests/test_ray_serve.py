"""Issue 12, the server on Ray Serve: a real local Ray cluster (started here, 2 CPUs), two
replicas of the tiny v1 model behind Serve's HTTP proxy, and the voice library in a real local S3
server (moto). Every mode of the tiny model through the proxy; a voice created through the proxy
used wherever the next requests land (both replicas seen); /ready and replica-labelled /metrics;
overload answered 429; a replica killed with SIGKILL mid-load: its in-flight requests fail, no
stored voice is lost, the living replica keeps answering and Ray starts a new one. Deploys that
cannot run fail at once (a replica no node can hold; none placed by the deadline), a stop while
nothing was placed is quick, and a command's stop leaves an application another one redeployed.

Marked ``ray`` (deselect with ``-m 'not ray'``); about 75 s on 2 cores, a third of it starting
the cluster and the replicas. Skipped only when ray cannot be imported."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip(
    "ray", reason="ray is not installed (the 'ray' extra: pip install -e '.[ray]')"
)
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed")

import boto3  # noqa: E402 - dev dependencies, as moto (the S3 server)
from test_server_support import (  # noqa: E402
    decode,
    free_port,
    metric,
    moto_server,
    prompt_wav,
    wait_for,
)
from test_voice_store_s3 import BUCKET  # noqa: E402

from cosyvoice_lite.errors import CosyVoiceError  # noqa: E402
from cosyvoice_lite.serving import S3Settings, Settings, ray_serve  # noqa: E402
from cosyvoice_lite.serving.ray_serve import (  # noqa: E402
    APP_NAME,
    REPLICA_HEADER,
    RayOptions,
    build_application,
    deploy,
    start_serve,
)

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
VOICE = "Mira"
TEXT = "你好，今天天气很好。"
LONG_TEXT = "今天天气很好，我们一起去公园散步吧。" * 3


@pytest.fixture(scope="module")
def proxy(v1_dir, tmp_path_factory):
    """Serve's proxy URL, 2 replicas (1 CPU each, batch 1 + queue 1) sharing an S3 library."""
    with moto_server() as s3_url:
        boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        # the replicas inherit this environment (S3 credentials, the vocabulary cache)
        # Serve's controller says a replica waits for a node after 1 s, not 30 (its processes
        # inherit this environment): a deploy's placement deadline is tested in seconds
        slow = {
            "RAY_SERVE_SLOW_STARTUP_WARNING_S": "1",
            "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "1",
        }
        saved = {name: os.environ.get(name) for name in slow}
        os.environ.update(slow)
        # a cluster of its own ("local"), even where one runs already (`ray start`): joining it
        # refused these options, and would have run the replicas on its nodes
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
        try:
            settings = Settings(
                voices_dir=tmp_path_factory.mktemp("voices"),
                voices_s3=S3Settings(BUCKET, "ray/", s3_url, "us-east-1"),
                workers=1,
                max_queue=1,
                log_requests=False,
                keep_alive_timeout=1,  # Serve's proxy applies it (its own default: 90 s)
            )
            options = RayOptions(
                replicas=2,
                replica_cpus=1,
                load={"model": str(v1_dir)},
                health_check_period_s=1.0,
                port=free_port(),
            )
            host, port = start_serve(settings, options)  # as `serve --ray` starts Serve
            deploy(build_application(settings, options), options)
            yield f"http://{host}:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="module")
def client(proxy):
    with httpx.Client(base_url=proxy, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def voice(client) -> str:
    """A voice saved through the proxy (in the bucket), for every test of the module."""
    created = client.post(
        "/voices",
        data={"name": VOICE, "prompt_text": "希望你以后能够做的比我还好呦。"},
        files={"audio": ("p.wav", prompt_wav(1.5), "audio/wav")},
    )
    assert created.status_code == 201, created.text
    return VOICE


def speak(client, speaker: str, **fields) -> httpx.Response:
    return client.post("/tts", json={"text": TEXT, "speaker": speaker, "seed": 1, **fields})


def assert_audio(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    samples, rate = decode(response.content)
    assert rate == 22050 and len(samples) > 0 and abs(samples).max() > 0


def replica_call(function, app: str = APP_NAME) -> dict:
    """Replica id (as in X-Replica) -> ``function(actor)`` run in each replica's process."""
    found = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            result = ray.get(handle.__ray_call__.remote(function), timeout=30)
            found[actor["name"].rsplit("#", 1)[1]] = result
    return found


def replica_pids() -> dict[str, int]:
    """Replica id (as in X-Replica) -> process id, asked of each replica actor."""
    return replica_call(lambda _: os.getpid())


def test_every_mode_and_a_shared_voice_through_the_proxy(client, voice):
    assert client.get("/ready").json()["status"] == "ready"
    # one request id per response: the client's (or Serve's UUID), which the app logs too
    traced = client.get("/health", headers={"X-Request-Id": "trace-7.a"})
    assert traced.headers.get_list("x-request-id") == ["trace-7.a"]
    assert len(client.get("/health").headers.get_list("x-request-id")) == 1
    odd = client.get("/health", headers={"X-Request-Id": "span:7/a"})  # kept by Serve, not the app
    assert odd.headers.get_list("x-request-id") == ["span:7/a"]
    assert len(odd.headers["x-replica-request-id"]) == 16  # the app's own, for its logs and files
    info = client.get("/info").json()
    modes = info["model"]["modes"]
    preset = client.get("/speakers").json()["speakers"][0]["name"]
    seen = set()
    for mode in modes:
        if mode == "preset":
            response = speak(client, preset, mode=mode)
        elif mode == "instruct":
            response = speak(client, preset, mode=mode, instruct="Speak happily.")
        elif mode == "vc":
            response = client.post(
                "/tts/upload",
                data={"speaker": VOICE},
                files={"source_wav": ("s.wav", prompt_wav(1.0), "audio/wav")},
            )
        else:  # zero_shot, cross_lingual: the voice just created, on whichever replica
            response = speak(client, VOICE, mode=mode)
        assert_audio(response)
        seen.add(response.headers[REPLICA_HEADER])
    streamed = speak(client, VOICE, stream=True)
    assert_audio(streamed)
    seen.add(streamed.headers[REPLICA_HEADER])
    # the saved voice is usable wherever the requests land: until both replicas have served
    for _ in range(30):
        if len(seen) == 2:
            break
        response = speak(client, VOICE)
        assert_audio(response)
        seen.add(response.headers[REPLICA_HEADER])
    assert len(seen) == 2, seen
    # each replica's /metrics names it; bad input gets the same JSON errors as one process
    metrics = client.get("/metrics")
    assert f'replica="{metrics.headers[REPLICA_HEADER]}"' in metrics.text
    assert "cosyvoice_model_loaded{replica=" in metrics.text
    error = client.post("/tts", json={"text": TEXT, "speaker": "nobody"})
    assert error.status_code == 404 and error.json()["error"]["message"]


def test_a_client_hanging_up_mid_stream_stops_its_synthesis(client, voice):
    """Serve's proxy tells the replica by raising from ``receive``: the replica takes it as the
    disconnect it is (the row cancelled, counted), not as an error of the app."""
    body = {"text": LONG_TEXT, "speaker": voice, "seed": 1, "stream": True, "format": "pcm"}
    with client.stream("POST", "/tts", json=body) as response:
        assert response.status_code == 200
        replica = response.headers[REPLICA_HEADER]
        next(response.iter_raw())  # first audio arrived; now hang up

    def counted() -> bool:
        metrics = client.get("/metrics")  # from whichever replica answers
        if metrics.headers[REPLICA_HEADER] != replica:
            return False
        text = metrics.text
        return metric(text, "cosyvoice_cancelled_total", replica=replica) == 1 and (
            metric(text, "cosyvoice_requests_in_flight", replica=replica) == 0
        )

    assert wait_for(counted, timeout=30), "the replica did not stop the stream"
    # a whole request whose client gives up: Serve cancels the replica's task, which had been
    # answered as a shutdown (503 shutting_down, an error) instead of a client gone (499)
    whole = {"text": LONG_TEXT * 20, "speaker": voice, "seed": 2}  # seconds to make
    with pytest.raises(httpx.TimeoutException):
        client.post("/tts", json=whole, timeout=0.5)
    seen: dict[str, str] = {}

    def recorded() -> bool:
        metrics = client.get("/metrics")
        seen[metrics.headers[REPLICA_HEADER]] = metrics.text
        return any(
            metric(text, "cosyvoice_requests_total", endpoint="/tts", status="499") >= 1
            for text in seen.values()
        )

    assert wait_for(recorded, timeout=30), "no replica recorded the client's leaving as 499"
    for text in seen.values():
        assert metric(text, "cosyvoice_errors_total", code="shutting_down") == 0


def test_overload_is_answered_429(client, voice):
    def one(_):
        return client.post("/tts", json={"text": LONG_TEXT, "speaker": VOICE, "seed": 1})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses, statuses
    # as documented: a full replica's own JSON 429 at once, not Serve's queue (nor its 429)
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers.get("retry-after")
        assert refused.json()["error"]["code"], refused.text
        assert refused.headers[REPLICA_HEADER]


def test_replicas_log_as_the_app_does(client):
    """A Ray worker has no log handler of its own: the replica configures the app's (JSON
    lines by default), so the access log and INFO records are written."""
    formats = replica_call(
        lambda _: [
            (type(h.formatter).__name__, logging.getLogger().level)
            for h in logging.getLogger().handlers
        ]
    )
    assert len(formats) == 2
    for handlers in formats.values():
        assert handlers == [("JsonFormatter", logging.INFO)], handlers


def test_the_proxy_applies_the_keep_alive(proxy):
    """--keep-alive 1 reaches Serve's proxy (its own default: 90 s): an idle connection is
    closed after about 1 s."""
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=0.5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with contextlib.suppress(TimeoutError):
            while b'"status"' not in answer:  # the whole response (headers, then its body)
                answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        idle = time.monotonic()
        s.settimeout(10)
        assert s.recv(65536) == b""  # closed by the proxy
        assert time.monotonic() - idle < 5


def test_serve_running_elsewhere_is_not_silently_kept(proxy, tmp_path):
    """Serve keeps the proxy it runs with: another --port is an error naming the real one; the
    same address is used (and is the one reported)."""
    host, port = proxy.removeprefix("http://").split(":")
    settings = Settings(voices_dir=tmp_path, keep_alive_timeout=1)
    other = free_port()
    with pytest.raises(CosyVoiceError, match=f"at {host}:{port}, not the --host {host} --port"):
        start_serve(settings, RayOptions(port=other))
    assert start_serve(settings, RayOptions(port=int(port))) == (host, int(port))


def test_a_failed_deploy_says_why_and_leaves_no_application(client, v1_dir, tmp_path):
    """Every replica failing in its constructor: a CosyVoiceError with the replica's reason, and
    the application deleted (Serve would keep it, DEPLOY_FAILED, retrying)."""
    options = RayOptions(
        replica_cpus=0,
        load={"model": str(v1_dir), "flow_steps": 0},
        app_name="broken",
        route_prefix="/broken",
    )
    with pytest.raises(CosyVoiceError, match="flow") as failed:
        deploy(build_application(Settings(voices_dir=tmp_path), options), options)
    assert "'broken' deleted" in str(failed.value) and "Traceback" not in str(failed.value)
    assert "broken" not in serve.status().applications
    assert client.get("/ready").status_code == 200  # the other application is untouched


def test_a_replica_no_node_can_hold_fails_before_deploying(client, v1_dir, tmp_path):
    """GPUs on this CPU-only cluster, or more CPUs than its node has: Serve waited for ever
    (`serve --ray` never returned). An error naming the replica's needs and the nodes'."""
    for options, needs in (
        (RayOptions(replica_gpus=1, app_name="gpu", route_prefix="/gpu"), "GPU 1"),
        (RayOptions(replica_cpus=4, app_name="cpus", route_prefix="/cpus"), "CPU 4"),
    ):
        options.load = {"model": str(v1_dir)}
        with pytest.raises(CosyVoiceError, match="no node of the Ray cluster can hold") as failed:
            deploy(build_application(Settings(voices_dir=tmp_path), options), options)
        assert needs in str(failed.value) and "{CPU 2, GPU 0}" in str(failed.value)
        assert options.app_name not in serve.status().applications
    assert client.get("/ready").status_code == 200


def test_a_replica_never_placed_fails_at_the_deadline(client, v1_dir, tmp_path):
    """The node could hold one, but the module's replicas hold its CPUs: no replica placed
    within the deadline is an error, and the application is deleted at once (Serve waited
    graceful_shutdown_s, 310 s here, for a replica that never started)."""
    options = RayOptions(
        replica_cpus=1,
        load={"model": str(v1_dir)},
        app_name="unplaced",
        route_prefix="/unplaced",
        place_timeout=3,
    )
    started = time.monotonic()
    with pytest.raises(CosyVoiceError, match="no replica could be placed") as failed:
        deploy(build_application(Settings(voices_dir=tmp_path), options), options)
    assert "'unplaced' deleted" in str(failed.value) and '"CPU": 1' in str(failed.value)
    assert "unplaced" not in serve.status().applications
    assert time.monotonic() - started < 30
    assert client.get("/ready").status_code == 200


def test_a_redeploy_by_another_command_is_not_deleted_by_the_first(client, v1_dir, tmp_path):
    """Command B redeploys A's application in place (same name): A's stop deleted it, B's,
    while B ran on, saying nothing. A sees it is no longer its own and leaves it."""
    settings = Settings(voices_dir=tmp_path)
    first = RayOptions(
        replica_cpus=0,
        load={"model": str(v1_dir)},
        app_name="owned",
        route_prefix="/owned",
        owner="command-a",
    )
    state_a = deploy(build_application(settings, first), first)
    assert state_a.ran and state_a.claimed
    second = dataclasses.replace(first, owner="command-b")
    state_b = deploy(build_application(settings, second), second)
    with pytest.raises(ray_serve.AppLost, match="deployed again by another command"):
        ray_serve.own_app(state_a)
    ray_serve.delete_app("owned", 10, owner="command-a")  # A's stop: not A's any more
    assert client.get("/owned/health").status_code == 200
    ray_serve.own_app(state_b)
    ray_serve.delete_app("owned", 30, owner="command-b")
    assert "owned" not in serve.status().applications
    with pytest.raises(ray_serve.AppLost, match="deleted by someone else"):
        ray_serve.own_app(state_b)


SERVE_SCRIPT = """
import logging, sys
from cosyvoice_lite.serving import Settings
from cosyvoice_lite.serving.logs import configure
from cosyvoice_lite.serving.ray_serve import RayOptions, serve_on_ray

configure(logging.INFO)
address, port, model, voices, cpus, app = sys.argv[1:]
settings = Settings(voices_dir=voices, api_key="k", keep_alive_timeout=1)
options = RayOptions(address=address, port=int(port), replica_cpus=float(cpus),
                     load={"model": model}, app_name=app, route_prefix="/" + app,
                     health_check_period_s=1.0)
sys.exit(serve_on_ray(settings, options))
"""


def test_serve_on_a_joined_cluster_and_sigterm(proxy, client, v1_dir, tmp_path):
    """`serve --ray --ray-address` on a running cluster (this module's): the replicas get the
    command's environment (here a variable the cluster's processes lack), log the app's lines
    back to the command, answer /health without the key under a route prefix; SIGTERM deletes
    the application and exits 0 (Ray's own handler aborted)."""
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    port = proxy.rsplit(":", 1)[1]
    env = {**os.environ, "COSYVOICE_LITE_PROBE": "from-the-driver", "AWS_PROBE": "x"}
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, address, port, str(v1_dir), str(tmp_path)]
        + ["0", "joined"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for(lambda: client.get("/joined/health").status_code == 200, 120, 0.5)
        probes = replica_call(lambda _: os.environ.get("COSYVOICE_LITE_PROBE"), app="joined")
        assert list(probes.values()) == ["from-the-driver"]
        assert client.get("/joined/ready").status_code == 200  # public under the prefix
        assert client.get("/joined/speakers").status_code == 401
        missing = client.post(
            "/joined/tts",
            json={"text": TEXT, "speaker": "nobody"},
            headers={"Authorization": "Bearer k", "X-Request-Id": "find-me-7"},
        )
        assert missing.status_code == 404
        time.sleep(3)  # Ray forwards the replicas' lines in batches
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM received" not in output, output[-3000:]
    assert '"request_id": "find-me-7"' in output, output[-3000:]  # the replica's access log
    assert "joined" not in serve.status().applications
    assert client.get("/ready").status_code == 200


def test_a_stop_while_no_replica_was_placed_is_quick(proxy, v1_dir, tmp_path):
    """SIGTERM while the deploy waits for a node (the module's replicas hold the CPUs): no
    request can be running, so the application is deleted at once; Serve had waited
    graceful_shutdown_s (310 s here) for the replica that never started."""
    import subprocess
    import sys

    address = ray.get_runtime_context().gcs_address
    port = proxy.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, address, port, str(v1_dir), str(tmp_path)]
        + ["1", "waiting"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for(lambda: "waiting" in serve.status().applications, 120, 0.5)
        time.sleep(2)  # its replica waits for a node
    finally:
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0 and time.monotonic() - stopped < 30, output[-3000:]
    assert "no replica has run yet" in output, output[-3000:]
    assert wait_for(lambda: "waiting" not in serve.status().applications, 10, 0.5)


def test_a_replica_killed_mid_load_loses_no_voice(client, voice):
    before = replica_pids()
    assert len(before) == 2
    victim, pid = next(iter(before.items()))

    def one(_):
        try:
            response = client.post("/tts", json={"text": LONG_TEXT, "speaker": VOICE, "seed": 1})
        except httpx.HTTPError as exc:  # a stream cut when its replica died
            return type(exc).__name__
        return response.status_code

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(one, i) for i in range(4)]
        time.sleep(0.3)  # the requests are in the replicas
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        outcomes = [f.result() for f in running]
    # in-flight requests on the dead replica fail with a 5xx (or a cut stream), nothing hangs
    assert all(o == 200 or o == 429 or not isinstance(o, int) or o >= 500 for o in outcomes), (
        outcomes
    )
    # the cluster keeps answering with the living replica, and the voice is still there
    for _ in range(4):
        response = speak(client, VOICE)
        assert_audio(response)
        assert response.headers[REPLICA_HEADER] != victim
    assert client.get(f"/voices/{VOICE}").status_code == 200
    # Ray starts a new replica in place of the dead one
    assert wait_for(lambda: len(replica_pids()) == 2 and victim not in replica_pids(), 90, 0.5)
    recovered = time.monotonic() - killed
    seen = set()
    for _ in range(30):
        response = speak(client, VOICE)
        assert_audio(response)
        seen.add(response.headers[REPLICA_HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2 and victim not in seen
    print(f"\nreplica killed: outcomes {outcomes}; replaced after {recovered:.1f} s")


def test_a_serve_config_builds_the_same_deployment(v1_dir):
    """What a Serve config file / KubeRay RayService gives (``app_builder``) is what the CLI
    options give: autoscaling on ongoing requests, resources, the app's 429 before Serve's."""
    from cosyvoice_lite.serving.ray_serve import app_builder

    app = app_builder(
        {
            "model": str(v1_dir),
            "autoscale": "1:3",
            "replica_cpus": 2,
            "replica_gpus": 0.5,
            "max_batch": 4,
            "max_queue": 4,
            "docs_public": True,
        }
    )
    deployment = app._bound_deployment
    config = deployment._deployment_config
    assert config.autoscaling_config.min_replicas == 1
    assert config.autoscaling_config.max_replicas == 3
    assert config.autoscaling_config.target_ongoing_requests == 4  # one batch per replica
    # a burst up to what the 3 replicas hold is routed to them (the app answers)
    assert config.max_ongoing_requests > 8 and config.max_queued_requests == 3 * (8 + 4)
    assert deployment.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.5}
    settings = deployment._replica_config.init_args[0]
    assert settings.docs_public and settings.workers == 4
    # a bad option: argparse's reason in a ValueError (a SystemExit would kill Serve's builder)
    with pytest.raises(ValueError, match="not allowed with argument"):
        app_builder({"model": str(v1_dir), "replicas": 2, "autoscale": "1:3"})


def test_the_kuberay_manifest_builds_its_application():
    """deploy/kuberay/rayservice.yaml (not run on Kubernetes here): its Serve config is valid for
    this Ray and its args build the deployment it describes."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from cosyvoice_lite.serving.ray_serve import app_builder

    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "cosyvoice_lite.serving.ray_serve:app_builder"
    deployment = app_builder(application["args"])._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert deployment._replica_config.init_args[0].voices_s3.bucket == "cosyvoice-voices"


def test_serve_ray_stops_at_once_when_the_voice_bucket_is_unreachable(v1_dir):
    """`serve --ray` checks the voice bucket before starting anything: a clear error naming the
    bucket and the endpoint, and a failing exit status."""
    import subprocess
    import sys

    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cosyvoice_lite.cli",
            "serve",
            "--ray",
            "--model",
            str(v1_dir),
            "--replicas",
            "2",
            "--voices-s3-bucket",
            "team-voices",
            "--s3-endpoint-url",
            dead,
            "--s3-region",
            "us-east-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode != 0
    assert "'team-voices'" in done.stderr and dead in done.stderr, done.stderr
