"""Ray Serve benchmark: requests/s and latency through Serve's HTTP proxy with 1 and 2 replicas,
against the plain single-process server, in the same run, and what killing a replica costs.

    .venv/bin/python benchmarks/bench_ray.py                 # the tiny v1 model, ~2 minutes
    .venv/bin/python benchmarks/bench_ray.py --model DIR --requests 60 --clients 4

Steps: (1) the plain server (``cosyvoice-lite serve``, one process, ``--threads 1``); (2) a local
Ray cluster (``--cpus``, default 2) with 1 replica, then 2 replicas (1 CPU and 1 torch thread
each), each started by ``ray_serve.build_application`` as ``serve --ray`` does. For each, after a
warm-up, ``--requests`` /tts requests (the same texts and seeds everywhere) are sent by
``--clients`` concurrent clients; printed: requests/s, p50/p95 latency, failures, and the
resident memory of each serving process. (3) With 2 replicas, a replica is killed with SIGKILL
while the clients run: printed are the requests that failed, the time until requests succeed
again and until Ray has a second replica again. (4) Autoscaling 1:2 under twice the clients:
the time until Serve runs a second replica (Serve's default delays). Ratios against the plain
server, the load average and the floors (a /health round trip direct and through the proxy)
close the report.

Sizing for full-size models: benchmarks/bench_serving.py (one process, real model sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: no spinning OpenMP threads
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("COSYVOICE_LITE_CACHE", str(ROOT / ".cache"))  # as the tests (v1 vocab)
TEXTS = [
    "今天天气很好，我们一起去公园散步吧。",
    "你好，欢迎使用语音合成服务。",
    "希望你以后能够做的比我还好呦。",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def one_request(client: httpx.Client, i: int) -> tuple[float, int | str, str]:
    start = time.perf_counter()
    try:
        response = client.post(
            "/tts", json={"text": TEXTS[i % len(TEXTS)], "speaker": SPEAKER, "seed": i}
        )
        status: int | str = response.status_code
        replica = response.headers.get("x-replica", "")
    except httpx.HTTPError as exc:
        status, replica = type(exc).__name__, ""
    return time.perf_counter() - start, status, replica


def load(url: str, requests: int, clients: int, during=None) -> dict:
    """``requests`` requests from ``clients`` threads; ``during(t0)`` runs alongside."""
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        side = threading.Thread(target=during, args=(start,)) if during else None
        if side:
            side.start()
        futures = [
            pool.submit(lambda i=i: (time.perf_counter(), *one_request(client, i)))
            for i in range(requests)
        ]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - start
        if side:
            side.join()
    ok = [r for r in results if r[2] == 200]
    latencies = sorted(r[1] for r in ok)
    return {
        "rps": len(ok) / wall,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        if latencies
        else float("nan"),
        "failed": [r[2] for r in results if r[2] != 200],
        "replicas": sorted({r[3] for r in ok if r[3]}),
        "results": [(r[0] - start, r[1], r[2]) for r in results],
    }


def health_floor(url: str, n: int = 50) -> float:
    with httpx.Client(base_url=url, timeout=10) as client:
        client.get("/health")
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.get("/health")
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def replica_pids(ray) -> dict[str, int]:
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids[actor["name"].rsplit("#", 1)[1]] = ray.get(
                handle.__ray_call__.remote(lambda _: os.getpid()), timeout=60
            )
    return pids


def count_replicas(ray) -> int:
    """Replicas that answer (0 while one is starting or dying)."""
    try:
        return len(replica_pids(ray))
    except Exception:  # noqa: BLE001 - a replica starting or gone
        return 0


def ray_overhead_mb(replicas: set[int]) -> float:
    """RSS of this machine's Ray processes other than the replicas (and this driver), MB."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in replicas | {os.getpid()}:
            continue
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "site-packages/ray" in command or command.startswith("ray::"):
                total += rss_mb(int(entry.name))
    return total


def line(name: str, r: dict, memory: str) -> None:
    print(
        f"{name:<22} {r['rps']:7.2f} req/s   p50 {r['p50'] * 1000:7.0f} ms   "
        f"p95 {r['p95'] * 1000:7.0f} ms   failed {len(r['failed']):2d}   {memory}"
    )


def main() -> int:
    global SPEAKER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "tests" / "data" / "models" / "v1-tiny"))
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to the local Ray cluster")
    args = parser.parse_args()
    from cosyvoice_lite.engine import Engine

    with Engine.load(args.model) as engine:  # closed now, not whenever it is collected
        SPEAKER = engine.voices()[0]
    voices = tempfile.mkdtemp(prefix="bench-ray-voices-")
    results = {}

    # (1) the plain server, one process
    port = free_port()
    plain = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cosyvoice-lite"),
            "serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--threads",
            "1",
            "--voices-dir",
            voices,
            "--log-format",
            "text",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        load(url, 6, args.clients)  # warm-up
        results["plain"] = load(url, args.requests, args.clients)
        plain_floor = health_floor(url)
        line("plain server", results["plain"], f"RSS {rss_mb(plain.pid):.0f} MB")
    finally:
        plain.send_signal(signal.SIGINT)
        plain.wait(timeout=30)

    # (2) Ray Serve with 1 and 2 replicas
    import ray
    from ray import serve

    from cosyvoice_lite.serving import Settings
    from cosyvoice_lite.serving.ray_serve import APP_NAME, RayOptions, build_application

    ray.init(
        num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(voices_dir=Path(voices), log_requests=False)
    try:
        for replicas in (1, 2):
            options = RayOptions(
                replicas=replicas,
                replica_cpus=1,
                threads=1,
                load={"model": args.model, "max_batch": settings.workers},
                health_check_period_s=1.0,
            )
            started = time.perf_counter()
            serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
            deploy = time.perf_counter() - started
            load(url, 6, args.clients)
            r = results[f"ray{replicas}"] = load(url, args.requests, args.clients)
            pids = replica_pids(ray)
            memory = ", ".join(f"{rss_mb(p):.0f}" for p in pids.values())
            line(
                f"Ray Serve, {replicas} replica{'s' * (replicas > 1)}",
                r,
                f"replica RSS {memory} MB; served by {len(r['replicas'])}; deployed in "
                f"{deploy:.1f} s",
            )
        proxy_floor = health_floor(url)
        overhead = ray_overhead_mb(set(replica_pids(ray).values()))
        print(
            f"Ray's own processes (GCS, raylet, agents, Serve controller and proxy, idle "
            f"workers): {overhead:.0f} MB RSS"
        )

        # (3) a replica killed with SIGKILL under load
        pids = replica_pids(ray)
        victim, pid = next(iter(pids.items()))
        events = {}

        def kill(t0: float) -> None:
            time.sleep(1.5)
            events["killed"] = time.perf_counter() - t0
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    now = replica_pids(ray)
                    if len(now) == 2 and victim not in now:
                        events["replaced"] = time.perf_counter() - t0
                        return
                except Exception:  # noqa: BLE001 - a replica starting
                    pass
                time.sleep(0.25)

        r = load(url, args.requests, args.clients, during=kill)
        failures = [(t, s) for t, _, s in r["results"] if s != 200]
        after = [t for t, _, s in r["results"] if s == 200 and t > events["killed"]]
        line("2 replicas, one killed", r, f"failed: {[s for _, s in failures]}")
        first_ok = min(after) - events["killed"] if after else float("nan")
        print(
            f"  kill at {events['killed']:.1f} s: {len(failures)} requests failed "
            f"(in flight on the dead replica); first request started after the kill and "
            f"served: +{first_ok:.2f} s; Ray had 2 replicas again after "
            f"{events.get('replaced', float('nan')) - events['killed']:.1f} s"
        )

        # (4) autoscaling 1:2 on ongoing requests (Serve's default delays): time to scale up;
        # batch 2, so that the busy clients are more ongoing requests than one replica's target
        small = dataclasses.replace(settings, workers=2)
        options = RayOptions(
            autoscale=(1, 2),
            replica_cpus=1,
            threads=1,
            load={"model": args.model, "max_batch": small.workers},
            health_check_period_s=1.0,
        )
        serve.delete(APP_NAME)  # a fresh deployment starts at its initial (minimum) replicas
        serve.run(build_application(small, options), name=APP_NAME, route_prefix="/")
        start, stop = time.perf_counter(), threading.Event()
        before = count_replicas(ray)

        def keep_busy() -> None:
            with httpx.Client(base_url=url, timeout=120) as client:
                i = 0
                while not stop.is_set():
                    one_request(client, i)
                    i += 1

        busy = [threading.Thread(target=keep_busy) for _ in range(2 * args.clients)]
        for thread in busy:
            thread.start()
        scaled = None
        while time.perf_counter() - start < 150 and scaled is None:
            time.sleep(1)
            if count_replicas(ray) == 2:
                scaled = time.perf_counter() - start
        stop.set()
        for thread in busy:
            thread.join()
        print(
            f"autoscale 1:2: {before} replica at start, 2 after "
            f"{scaled if scaled is not None else float('nan'):.0f} s of "
            f"{2 * args.clients} busy clients"
        )
    finally:
        serve.shutdown()
        ray.shutdown()

    plain = results["plain"]
    print("\nratios against the plain server (requests/s; p95 latency):")
    for key, name in (("ray1", "1 replica"), ("ray2", "2 replicas")):
        print(
            f"  {name:<11} {results[key]['rps'] / plain['rps']:.2f}x req/s   "
            f"{results[key]['p95'] / plain['p95']:.2f}x p95"
        )
    print(f"  2 vs 1 replica: {results['ray2']['rps'] / results['ray1']['rps']:.2f}x req/s")
    print(
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} "
        f"cores; floors: /health round trip {plain_floor * 1000:.1f} ms direct, "
        f"{proxy_floor * 1000:.1f} ms through the proxy"
    )
    return 0


SPEAKER = ""

if __name__ == "__main__":
    sys.exit(main())
