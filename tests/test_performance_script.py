"""performance_test.sh runs real locust against a real server and judges the run honestly."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.scripts import free_ports, run_script, script_env
from tests.server import ServerThread


def perf(tmp_path: Path, *args: str, **env_extra: str) -> tuple[int, str, dict | None]:
    env = script_env(tmp_path, 8000, PERF_RESULTS_ROOT=str(tmp_path / "perf"), **env_extra)
    if "RERANKER_API_KEY" not in env_extra:
        env.pop("RERANKER_API_KEY", None)  # the caller's key must not leak into the run
    result = run_script("performance_test.sh", *args, env=env, timeout_s=300)
    runs = sorted((tmp_path / "perf").glob("*")) if (tmp_path / "perf").exists() else []
    summary = json.loads((runs[-1] / "summary.json").read_text()) if runs else None
    return result.returncode, result.stdout + result.stderr, summary


@pytest.fixture(scope="module")
def model_server() -> Iterator[ServerThread]:
    """The embedded model on torch: this file tests the script, not the backends."""
    with ServerThread(create_app(make_settings())) as server:
        yield server


@pytest.fixture(scope="module")
def tight_server() -> Iterator[ServerThread]:
    """The embedded model behind a queue of 2, so that a stress run is refused most of the time."""
    with ServerThread(create_app(make_settings(max_queue_size=2))) as server:
        yield server


def test_load_run_reports_every_request_and_writes_locust_reports(
    model_server: ServerThread, tmp_path: Path
) -> None:
    before = httpx.get(f"{model_server.url}/metrics").json()["requests_by_endpoint"]
    code, output, summary = perf(tmp_path, "load", "24", "2", "--url", model_server.url)
    after = httpx.get(f"{model_server.url}/metrics").json()["requests_by_endpoint"]
    assert code == 0, output
    assert summary is not None and summary["passed"]
    assert (summary["requests"], summary["successful"], summary["success_rate"]) == (24, 24, 1.0)
    served = sum(after.get(k, 0) - before.get(k, 0) for k in ("/v1/rerank", "/v1/embeddings"))
    assert served == 24
    assert summary["items_per_s"] > 0 and summary["latency_ms"]["p95"] >= summary["latency_ms"]["p50"]
    assert "PASS" in output and "p95" in output
    run_dir = next((tmp_path / "perf").iterdir())
    assert {"locust_stats.csv", "report.html", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    with open(run_dir / "locust_stats.csv", newline="") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert set(rows) <= {"/v1/rerank", "/v1/embeddings", "Aggregated"}  # only the measured requests
    assert (int(rows["Aggregated"]["Request Count"]), int(rows["Aggregated"]["Failure Count"])) == (24, 0)


def test_an_api_key_is_sent_and_a_401_is_reported_as_such(tmp_path: Path) -> None:
    app = create_app(make_settings(api_keys="s3cret"), backend=FakeBackend(ModelKind.CROSS_ENCODER))
    with ServerThread(app) as server:
        code, output, summary = perf(tmp_path / "none", "latency", "3", "--url", server.url)
        assert code == 1 and summary is not None and summary["statuses"] == {"401": 3}
        assert (
            "3 requests refused as unauthorized (401): pass --api-key KEY or set RERANKER_API_KEY" in output
        )
        code, output, summary = perf(
            tmp_path / "flag", "latency", "3", "--url", server.url, "--api-key", "s3cret"
        )
        assert code == 0 and summary is not None and summary["statuses"] == {"200": 3}, output
        code, output, _ = perf(
            tmp_path / "env", "latency", "3", "--url", server.url, RERANKER_API_KEY="s3cret"
        )
        assert code == 0, output


def test_p95_threshold_fails_the_run(model_server: ServerThread, tmp_path: Path) -> None:
    code, output, summary = perf(tmp_path, "latency", "5", "--url", model_server.url, "--max-p95-ms", "1")
    assert code == 1
    assert summary is not None and not summary["passed"] and "p95" in summary["failures"][0]
    assert "FAIL: p95" in output


def test_stress_is_refused_with_fast_503s_and_no_errors(tight_server: ServerThread, tmp_path: Path) -> None:
    code, output, summary = perf(tmp_path, "stress", "--url", tight_server.url)
    assert code == 0, output
    assert summary is not None
    assert summary["rejected_503"] > 0 and summary["successful"] > 0
    assert summary["errors"] == 0 and set(summary["statuses"]) <= {"200", "503"}
    # Refused at admission, never after waiting for the model: a refusal is quicker than the
    # typical answer (relative, so it holds on a loaded or slow machine too).
    assert summary["refusal_latency_ms"]["p50"] < summary["latency_ms"]["p50"]
    assert httpx.get(f"{tight_server.url}/health").json()["status"] == "healthy"


def test_no_server_is_a_usage_error(tmp_path: Path) -> None:
    code, output, _ = perf(tmp_path, "load", "--url", f"http://127.0.0.1:{free_ports(1)}")
    assert code == 2 and "no server ready" in output
    assert perf(tmp_path, "sideways")[0] == 2
