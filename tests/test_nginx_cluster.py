"""Three daemons from manage_reranker.sh behind a real nginx running the shipped config.

Requests spread over the instances; a stream of requests through nginx loses nothing
when one instance is SIGKILLed or drained (SIGTERM) in the middle of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from reranker.ops.instances import is_reranker_process
from tests.nginx_proxy import managed_cluster, nginx_in_front
from tests.scripts import REPO_ROOT, free_ports, run_script, script_env, wait_for

DOCUMENTS = [
    "A broken bone usually heals in six to eight weeks.",
    "The capital of France is Paris.",
    "Fractures in children heal faster than in adults.",
    "Bananas are rich in potassium.",
    "Physical therapy helps recovery after a fracture.",
    "The stock market closed higher today.",
]
BODY = {"query": "how long does a fracture take to heal", "documents": DOCUMENTS}
STREAM_REQUESTS = 240


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.base_port = free_ports(3)
        self.ports = [self.base_port + i for i in range(3)]
        self.env = script_env(tmp, self.base_port)
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "logs"

    def pid(self, port: int) -> int:
        return int((self.run_dir / f"reranker-{port}.pid").read_text())

    def total_requests(self, port: int) -> int:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).json()["total_requests"]

    def ensure_all_up(self) -> None:
        result = run_script("manage_reranker.sh", "start", *map(str, self.ports), env=self.env)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("cluster"))
    # Requests only, no jobs: each instance may keep its own (tests/test_job_cluster.py shares them).
    with managed_cluster(3, nodes.env, "--local-jobs"):
        yield nodes


@pytest.fixture(scope="module")
def nginx_url(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nginx_in_front(3, cluster.base_port, cluster.env, tmp_path_factory.mktemp("nginx")) as url:
        yield url


def stream_through(url: str, requests: int, on_done: int, action: callable) -> list[int]:
    """Send ``requests`` reranks through nginx from 6 clients; run ``action`` once ``on_done`` finished."""
    statuses: list[int] = []
    lock = threading.Lock()
    fired = threading.Event()

    def one(_: int) -> int:
        response = httpx.post(f"{url}/rerank", json=BODY, timeout=60)
        with lock:
            statuses.append(response.status_code)
            if len(statuses) == on_done and not fired.is_set():
                fired.set()
                action()
        return response.status_code

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(requests)))


def test_cluster_start_brings_up_three_healthy_instances(cluster: Cluster) -> None:
    result = run_script("manage_reranker.sh", "--json", "status", env=cluster.env)
    rows = json.loads(result.stdout)
    assert result.returncode == 0
    assert [row["port"] for row in rows] == cluster.ports
    assert all(row["health"] == "healthy" and row["pid"] for row in rows)
    assert len({row["pid"] for row in rows}) == 3


def test_nginx_spreads_requests_and_answers_like_an_instance(cluster: Cluster, nginx_url: str) -> None:
    before = {port: cluster.total_requests(port) for port in cluster.ports}
    direct = httpx.post(f"http://127.0.0.1:{cluster.ports[0]}/rerank", json=BODY, timeout=60).json()
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(f"{nginx_url}/rerank", json=BODY, timeout=60), range(60))
        )
    assert [r.status_code for r in responses] == [200] * 60
    expected = [(row["index"], row["score"]) for row in direct["results"]]
    for response in responses:  # batch composition differs between calls: equal within float noise
        got = [(row["index"], row["score"]) for row in response.json()["results"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    served = {port: cluster.total_requests(port) - before[port] for port in cluster.ports}
    served[cluster.ports[0]] -= 1  # the direct call
    assert sum(served.values()) == 60
    assert all(count > 0 for count in served.values()), served


def test_aggregate_metrics_sums_the_instances(cluster: Cluster, nginx_url: str) -> None:
    ports = [str(p) for p in cluster.ports]
    result = subprocess.run(
        ["python3", str(REPO_ROOT / "aggregate_metrics.py"), "--json", *ports], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["cluster"]
    totals = [httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).json() for p in ports]
    assert report["total_requests"] == sum(t["total_requests"] for t in totals) > 0
    assert report["successful_requests"] == sum(t["successful_requests"] for t in totals)
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    down = subprocess.run(
        ["python3", str(REPO_ROOT / "aggregate_metrics.py"), *ports, str(free_ports(1))],
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1 and "unreachable" in down.stdout and "2/4" not in down.stdout


@pytest.mark.parametrize(("sig", "victim_index"), [(signal.SIGKILL, 0), (signal.SIGTERM, 1)])
def test_losing_an_instance_mid_stream_loses_no_request(
    cluster: Cluster, nginx_url: str, sig: signal.Signals, victim_index: int
) -> None:
    """SIGKILL: in-flight requests break and nginx retries them; SIGTERM: the instance drains."""
    cluster.ensure_all_up()
    victim = cluster.ports[victim_index]
    pid = cluster.pid(victim)
    statuses = stream_through(nginx_url, STREAM_REQUESTS, 60, lambda: os.kill(pid, sig))
    assert statuses == [200] * STREAM_REQUESTS
    wait_for(lambda: not is_reranker_process(pid), "the instance exits")
    status = run_script("manage_reranker.sh", "--json", "status", *map(str, cluster.ports), env=cluster.env)
    rows = {row["port"]: row for row in json.loads(status.stdout)}
    assert status.returncode == 3 and rows[victim]["health"] == "down"
    log = (cluster.log_dir / f"reranker-{victim}.log").read_text()
    drained = "drained: every admitted request finished" in log
    assert drained == (sig == signal.SIGTERM)


def test_cluster_stop_stops_every_instance_gracefully(cluster: Cluster) -> None:
    cluster.ensure_all_up()
    result = run_script("manage_reranker.sh", "--json", "cluster-stop", env=cluster.env)
    stopped = json.loads(result.stdout)
    assert result.returncode == 0
    assert sorted(row["port"] for row in stopped) == cluster.ports
    assert all(row["how"] == "sigterm" for row in stopped)
    status = run_script("manage_reranker.sh", "--json", "status", *map(str, cluster.ports), env=cluster.env)
    assert status.returncode == 3
    assert all(row["health"] == "down" for row in json.loads(status.stdout))
