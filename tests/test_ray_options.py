"""``serve --ray`` without a cluster: the options it gives Serve (environment, keep-alive,
graceful stop), the options it cannot apply, the checks it makes before deploying, the Serve
config entry point's errors, and the app under a route prefix (Serve's ``root_path``) on the
real HTTP stack (uvicorn mounts the app at a root path as Serve's proxy does).

Also what fails before any cluster is joined (an address nothing answers at, a stale record of
`ray start`, a cluster refusing the command's token) and the check of a replica's resources
against the nodes. Skipped only when ray cannot be imported; no Ray cluster is started (about
10 s)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the 'ray' extra)")

from test_server_support import ServerThread, free_port, metric, tiny_engine  # noqa: E402

from cosyvoice_lite.cli import main  # noqa: E402
from cosyvoice_lite.errors import CosyVoiceError, InvalidRequestError  # noqa: E402
from cosyvoice_lite.serving import Settings, ray_serve  # noqa: E402
from cosyvoice_lite.serving.app import create_app  # noqa: E402
from cosyvoice_lite.serving.cli import check_replica_load_options  # noqa: E402
from cosyvoice_lite.serving.ray_serve import (  # noqa: E402
    REPLICA_HEADER,
    RayOptions,
    ReplicaLabel,
    ReplicaServer,
    app_builder,
    build_application,
    deployment_options,
    http_options,
    replica_env,
    serve_on_ray,
    unapplied_options,
)

KEY = "k-123"


def test_replicas_get_the_variables_the_engine_and_storage_read(tmp_path):
    """On a cluster started elsewhere replicas do not inherit the deploying command's
    environment: S3 credentials, the model cache and hub, proxies go with the deployment."""
    environ = {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret-value",
        "COSYVOICE_LITE_CACHE": "/srv/cache",
        "HF_TOKEN": "hf",
        "HTTPS_PROXY": "http://proxy:3128",
        "PATH": "/usr/bin",
        "HOME": "/home/me",
        "RAY_ADDRESS": "auto",
    }
    env = replica_env(environ)
    assert env == {k: environ[k] for k in environ if k not in ("PATH", "HOME", "RAY_ADDRESS")}
    options = RayOptions(env_vars=env, load={"model": "/m"})
    assert "secret-value" not in repr(options)  # a logged RayOptions shows no secret
    actor = deployment_options(Settings(voices_dir=tmp_path), options)["ray_actor_options"]
    assert actor["runtime_env"] == {"env_vars": env}
    # as Serve takes it
    bound = build_application(Settings(voices_dir=tmp_path), options)._bound_deployment
    assert bound.ray_actor_options["runtime_env"]["env_vars"]["AWS_ACCESS_KEY_ID"] == "id"
    # nothing to pass: no runtime_env at all (a Serve config's pods have their own environment)
    plain = deployment_options(Settings(voices_dir=tmp_path), RayOptions())
    assert "runtime_env" not in plain["ray_actor_options"]


def test_replicas_finish_their_requests_when_stopped(tmp_path):
    """Scale-down, redeploy and delete stop replicas: Serve waits graceful_shutdown_timeout_s for
    their requests, which may each run the request timeout, then the app's own stop."""
    settings = Settings(voices_dir=tmp_path, request_timeout=300, shutdown_timeout=10)
    config = deployment_options(settings, RayOptions())
    assert config["graceful_shutdown_timeout_s"] == 310
    # Serve's wait for the health probe outlasts the replica's own wait for its engine loop
    assert config["health_check_timeout_s"] > ray_serve.HEALTH_WAIT
    deployment = app_builder({"model": "/m", "timeout": 60, "shutdown_timeout": 5})
    assert deployment._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 65


def test_connection_options_serve_applies_and_those_it_cannot(tmp_path):
    settings = Settings(voices_dir=tmp_path, keep_alive_timeout=1.5, request_timeout=60)
    # whole seconds, rounded up; no proxy deadline: Serve's runs over the whole response and
    # cut a stream made in time whose client read it in real time
    assert http_options(settings) == {"keep_alive_timeout_s": 2}
    assert http_options(Settings(voices_dir=tmp_path))["keep_alive_timeout_s"] == 5
    assert unapplied_options(Settings(voices_dir=tmp_path)) == []  # defaults: nothing asked
    given = Settings(voices_dir=tmp_path, header_timeout=2, max_connections=64, body_timeout=5)
    warnings = unapplied_options(given)
    assert len(warnings) == 2, warnings  # --body-timeout is the app's: it applies
    assert "--header-timeout" in warnings[0] and "--max-connections" in warnings[1]
    assert "rounded up to 2 s" in unapplied_options(settings)[0]


def test_a_serve_config_with_a_bad_option_raises_with_argparse_reason():
    """In Serve's build task a SystemExit kills the worker and hides the reason: a ValueError
    carries it into the application's status."""
    for args, reason in (
        ({"model": "/m", "max_batchh": 8}, "unrecognized arguments: --max-batchh 8"),
        ({"model": "/m", "replicas": "two"}, "--replicas: invalid int value: 'two'"),
        ({"model": "/m", "replicas": 2, "autoscale": "1:3"}, "not allowed with argument"),
        ({"model": "/m", "autoscale": 64}, "--autoscale wants MIN:MAX"),
    ):
        with pytest.raises(ValueError, match=reason):
            app_builder(args)


def test_serve_ray_refuses_bad_load_options_before_starting_ray(v1_dir, capsys):
    """The checks of Engine.load that do not depend on the device run in the deploying
    command: a clear error and exit status 2, as without --ray, and no cluster started."""
    import ray

    code = main(["serve", "--ray", "--model", str(v1_dir), "--flow-steps", "0"])
    assert code == 2
    assert "flow" in capsys.readouterr().err.lower()
    assert not ray.is_initialized()
    # the device is the replicas' to check: one this machine lacks passes here, the rest not
    check_replica_load_options({"device": "cuda:7", "dtype": "bfloat16", "flow_steps": 4})
    with pytest.raises(InvalidRequestError):
        check_replica_load_options({"device": "cuda:7", "flow_steps": 0})


def _not_deployed(*args: object) -> int:
    pytest.fail("the options passed the deploying command's checks")


def test_serve_ray_refuses_threads_below_one_before_starting_ray(
    v1_dir, tmp_path, capsys, monkeypatch
):
    """--threads 0 was taken as unset (replicas got their CPU count) and -3 failed in every
    replica (a slow, retried deploy): both are refused at once, as without --ray. The upper
    bound (4 per core) is the replica's machine's to check."""
    import ray

    monkeypatch.setattr(ray_serve, "serve_on_ray", _not_deployed)
    for threads in ("0", "-3"):
        code = main(["serve", "--ray", "--model", str(v1_dir), "--threads", threads])
        assert code == 2
        assert f"--threads must be from 1 to 4 per core of a replica's machine, got {threads}" in (
            capsys.readouterr().err
        )
        assert not ray.is_initialized()
    with pytest.raises(ValueError, match="--threads"):  # a Serve config's args, too
        app_builder({"model": "/m", "threads": 0})
    # unset: the replica's CPUs, at least 1; a number: as given, however large here
    settings = Settings(voices_dir=tmp_path)
    bound = build_application(settings, RayOptions(replica_cpus=2.5))._bound_deployment
    assert bound.init_args[2] == 2
    bound = build_application(settings, RayOptions(threads=100_000))._bound_deployment
    assert bound.init_args[2] == 100_000


def test_serve_ray_refuses_a_precision_no_replica_device_runs(v1_dir, capsys, monkeypatch):
    """A device this machine lacks is the replicas' to check, but not the precision: int8 on
    cuda was accepted here and refused by every GPU replica."""
    import ray

    from cosyvoice_lite.errors import DeviceError

    monkeypatch.setattr(ray_serve, "serve_on_ray", _not_deployed)
    # (on a machine with a GPU, Engine's own checks answer the same)
    argv = ["serve", "--ray", "--model", str(v1_dir), "--device", "cuda", "--quantize", "int8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "quantisation 'int8' is not supported on cuda:0; supported there: none" in err
    assert not ray.is_initialized()
    with pytest.raises(DeviceError, match="not supported on xpu:0"):
        check_replica_load_options({"device": "xpu:3", "quantize": "int8"})
    with pytest.raises(DeviceError, match="unknown dtype"):
        check_replica_load_options({"device": "cuda:7", "dtype": "float64"})
    with pytest.raises(DeviceError, match="'mps' is not supported"):  # no machine runs it
        check_replica_load_options({"device": "mps"})
    for typo in ("gpu", "cuda0", "cuda:x"):  # no machine's torch parses them: every replica failed
        with pytest.raises(DeviceError, match="unknown device"):
            check_replica_load_options({"device": typo, "quantize": "int8"})
    # a GPU's dtypes (bfloat16 from Ampere) and a back-end this torch lacks: the replicas'
    for device, dtype in (("cuda:7", "bfloat16"), ("cuda", "float16"), ("npu", "float32")):
        check_replica_load_options({"device": device, "dtype": dtype})


@pytest.fixture(scope="module")
def prefixed(v1_dir, tmp_path_factory):
    """The replica's app (API key set) mounted at /cv, as under a Serve route_prefix: the path
    the app gets includes the root path."""
    settings = Settings(voices_dir=tmp_path_factory.mktemp("voices"), api_key=KEY)
    app = ReplicaLabel(create_app(tiny_engine(v1_dir), settings), "r1")
    running = ServerThread(app)
    running.server.config.root_path = "/cv"  # uvicorn prepends it to every path, as Serve
    with running, running.client() as client:
        yield client


def test_under_a_route_prefix_probes_are_public_and_metrics_labelled(prefixed):
    for path in ("/health", "/ready"):
        response = prefixed.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers[REPLICA_HEADER] == "r1"
    assert prefixed.get("/speakers").status_code == 401  # the rest still needs the key
    auth = {"Authorization": f"Bearer {KEY}"}
    metrics = prefixed.get("/metrics", headers=auth)
    assert metrics.status_code == 200
    assert metric(metrics.text, "cosyvoice_model_loaded", replica="r1") == 1
    # OpenAI routes answer a bad body 400, as without a prefix
    bad = prefixed.post("/v1/audio/speech", json={"input": "hi"}, headers=auth)
    assert bad.status_code == 400, bad.text
    # the API docs page is not given the web page's script policy, which blocks Swagger UI
    from cosyvoice_lite.serving.guard import PAGE_CSP

    docs = prefixed.get("/docs", headers=auth)
    assert docs.status_code == 200
    assert docs.headers.get("content-security-policy") != PAGE_CSP


def test_app_path_strips_only_a_whole_root_segment():
    from cosyvoice_lite.serving.guard import app_path

    assert app_path({"path": "/cv/health", "root_path": "/cv"}) == "/health"
    assert app_path({"path": "/cv", "root_path": "/cv"}) == "/"
    assert app_path({"path": "/cvx/health", "root_path": "/cv"}) == "/cvx/health"
    assert app_path({"path": "/health", "root_path": ""}) == "/health"
    assert app_path({"path": "/health"}) == "/health"


def test_a_burst_the_replicas_hold_is_routed_to_them(tmp_path):
    """Serve's router drops what waits beyond max_queued_requests with its plain 429, even while
    replicas have room: it holds what all replicas may hold, so the app answers the rest."""
    settings = Settings(voices_dir=tmp_path, workers=1, max_queue=1)
    fixed = deployment_options(settings, RayOptions(replicas=2))
    assert fixed["max_ongoing_requests"] == 2 + 4
    assert fixed["max_queued_requests"] == 2 * (2 + 4)
    scaled = deployment_options(settings, RayOptions(autoscale=(0, 3)))
    assert scaled["max_queued_requests"] == 3 * (2 + 4)


def test_an_address_nothing_answers_at_fails_at_once(v1_dir, tmp_path):
    """ray.init retried a dead address for about 14 minutes: a TCP check first, exit 2."""
    dead = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "cosyvoice_lite.cli", "serve", "--ray", "--ray-address", dead]
        + ["--model", str(v1_dir), "--voices-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"no Ray cluster answers at {dead} (is `ray start` running there?)" in done.stderr
    with pytest.raises(CosyVoiceError, match=f"answers at {dead}"):  # Ray Client's too
        ray_serve.check_reachable(f"ray://{dead}")
    # "auto" on a machine whose `ray start` crashed: the address it recorded is dead
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    with pytest.raises(CosyVoiceError, match="ray_current_cluster.*stopped or crashed"):
        ray_serve.check_reachable("auto", {"RAY_TMPDIR": str(tmp_path)})
    ray_serve.check_reachable(
        "auto", {"RAY_TMPDIR": str(tmp_path / "none")}
    )  # Ray's to look for one


class _Initialised(Exception):
    pass


def test_no_address_starts_a_cluster_here_not_a_crashed_one(v1_dir, tmp_path, monkeypatch):
    """Without --ray-address a cluster of its own, as documented: ray.init(None) joined the one
    `ray start` last recorded, and retried it for 14 minutes when that one had crashed. A
    `ray job submit` entrypoint's RAY_ADDRESS is still the cluster to join."""
    import ray

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    asked = []

    def init(address=None, **kwargs):
        asked.append(address)
        raise _Initialised

    monkeypatch.setattr(ray, "init", init)
    settings = Settings(voices_dir=tmp_path)
    with pytest.raises(_Initialised):
        serve_on_ray(settings, RayOptions(load={"model": str(v1_dir)}))
    with socket.socket() as listening:  # a cluster answering at RAY_ADDRESS
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(_Initialised):
            serve_on_ray(settings, RayOptions(load={"model": str(v1_dir)}))
    assert asked == ["local", address]


def test_a_refused_connection_names_token_authentication(v1_dir, tmp_path, monkeypatch):
    """A `ray start` cluster has token authentication on; Ray sends the token on its own only to
    a cluster it finds ("auto"): an address given failed with a bare "Failed to connect", the
    reason (Unauthenticated) among Ray's warnings."""
    import ray

    def init(address=None, **kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        options = RayOptions(address=address, load={"model": str(v1_dir)})
        with pytest.raises(CosyVoiceError, match="set RAY_AUTH_MODE=token") as failed:
            serve_on_ray(Settings(voices_dir=tmp_path), options)
    assert f"Failed to connect to Ray cluster at {address}" in str(failed.value)


def test_a_replica_no_node_can_hold_is_named_with_the_nodes():
    """Serve waited for ever for a node that fits (--replica-gpus 1 on CPU machines)."""
    head = {"Alive": True, "Resources": {"CPU": 0.0, "memory": 8 * 2**30}}  # --num-cpus=0
    cpu = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * 2**30}}
    gone = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    gpu = {"num_cpus": 1.0, "num_gpus": 1.0}
    reason = ray_serve.unplaceable(gpu, [head, cpu, gone])
    assert reason is not None
    assert "needs CPU 1, GPU 1" in reason and "2 node(s) have {CPU 0, GPU 0}, {CPU 2, GPU 0}" in (
        reason
    )
    assert "needs CPU 4, GPU 0" in (
        ray_serve.unplaceable({"num_cpus": 4.0, "num_gpus": 0}, [cpu]) or ""
    )
    assert "GPU 0, memory 16 GiB (" in (ray_serve.unplaceable({"memory": 16 * 2**30}, [cpu]) or "")
    # one node holding all of it is enough; a replica asking nothing fits anywhere
    card = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    assert ray_serve.unplaceable(gpu, [head, cpu, card]) is None
    assert ray_serve.unplaceable({"num_cpus": 0.0, "num_gpus": 0.5}, [card]) is None
    assert ray_serve.unplaceable({"num_cpus": 0, "num_gpus": 0}, []) is None


def test_a_deployment_names_the_command_that_made_it(tmp_path):
    """Each command's id in its deployment (user_config, a lightweight update): its stop
    deletes the application only while the running one is still its own."""
    settings = Settings(voices_dir=tmp_path)
    config = deployment_options(settings, RayOptions(owner="c-1"))
    assert config["user_config"] == {"deployed_by": "c-1"}
    assert "user_config" not in deployment_options(settings, RayOptions())
    assert callable(ReplicaServer.reconfigure)  # Serve refuses a user_config without it
    with pytest.raises(ValueError, match="placement timeout"):
        RayOptions(place_timeout=0)
