"""``serve --ray`` without a cluster: the options it gives Serve (environment, keep-alive,
graceful stop), the options it cannot apply, the checks it makes before deploying, the Serve
config entry point's errors, and the app under a route prefix (Serve's ``root_path``) on the
real HTTP stack (uvicorn mounts the app at a root path as Serve's proxy does).

Skipped only when ray cannot be imported; no Ray cluster is started (about 5 s)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the 'ray' extra)")

from test_server_support import ServerThread, metric, tiny_engine  # noqa: E402

from cosyvoice_lite.cli import main  # noqa: E402
from cosyvoice_lite.errors import InvalidRequestError  # noqa: E402
from cosyvoice_lite.serving import Settings, ray_serve  # noqa: E402
from cosyvoice_lite.serving.app import create_app  # noqa: E402
from cosyvoice_lite.serving.cli import check_replica_load_options  # noqa: E402
from cosyvoice_lite.serving.ray_serve import (  # noqa: E402
    REPLICA_HEADER,
    RayOptions,
    ReplicaLabel,
    app_builder,
    build_application,
    deployment_options,
    http_options,
    replica_env,
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
    deployment = app_builder({"model": "/m", "timeout": 60, "shutdown_timeout": 5})
    assert deployment._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 65


def test_connection_options_serve_applies_and_those_it_cannot(tmp_path):
    settings = Settings(voices_dir=tmp_path, keep_alive_timeout=1.5)
    assert http_options(settings) == {"keep_alive_timeout_s": 2}  # whole seconds, rounded up
    assert http_options(Settings(voices_dir=tmp_path)) == {"keep_alive_timeout_s": 5}
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
