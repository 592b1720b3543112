"""The shipped alert rules and Grafana dashboard work against a real Prometheus scraping real servers.

deploy/prometheus/alerts.yml passes ``promtool check rules`` and its unit tests; every series the
rules and the dashboard name is one the server exports; a Debian ``prometheus`` scraping two live
instances answers every panel's query with data and evaluates every rule without error.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.scripts import REPO_ROOT, free_ports, require_tool, wait_for
from tests.server import ServerThread

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO_ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "reranker.json"
# What Grafana puts in place of its variables when the dashboard asks for them.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "30s", "$instance": ".*"}
SERIES_NAME = re.compile(r"\b((?:reranker|process)_[a-z_]+)\b")


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, its PromQL with Grafana's variables filled in), for every target of every panel."""
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, (panel["title"], expr)
            queries.append((panel["title"], expr))
    return queries


def fake_server() -> ServerThread:
    return ServerThread(create_app(make_settings(), backend=FakeBackend(ModelKind.BI_ENCODER)))


def send_traffic(server: ServerThread) -> None:
    with server.client() as client:
        for _ in range(3):
            ranked = client.post("/rerank", json={"query": "apple", "documents": ["apple pie", "car"]})
            assert ranked.status_code == 200
            assert client.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200
        assert client.post("/rerank", json={"query": "", "documents": ["a"]}).status_code == 422


def exported_series(server: ServerThread) -> set[str]:
    with server.client() as client:
        text = client.get("/metrics", params={"format": "prometheus"}).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = require_tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a test that expects it to fire
    unit_tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"] for test in unit_tests for check in test["alert_rule_test"] if check["exp_alerts"]
    }
    assert fired == {rule["alert"] for rule in rules()}


def test_rules_and_dashboard_name_only_series_the_server_exports() -> None:
    with fake_server() as server:
        send_traffic(server)
        exported = exported_series(server)
    named = {name for rule in rules() for name in SERIES_NAME.findall(rule["expr"])}
    named |= {name for _, expr in panel_queries() for name in SERIES_NAME.findall(expr)}
    assert named and named - exported == set()
    assert {"reranker_requests_total", "reranker_request_duration_seconds_bucket"} <= named


def test_dashboard_has_a_datasource_variable_that_every_query_uses() -> None:
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    titles = {panel["title"] for panel in board["panels"]}
    for wanted in ("Request rate", "Error rate", "Latency", "Queue depth", "Batch size", "Job backlog"):
        assert any(title.startswith(wanted) for title in titles), wanted
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])


@contextmanager
def running_prometheus(tmp: Path, targets: list[str]) -> Iterator[str]:
    """Debian's prometheus scraping ``targets`` every second with the shipped rules; yields its URL."""
    prometheus = require_tool("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "reranker", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_ports(1)
    log = (tmp / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "prometheus ready")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def api(url: str, path: str, **params: str) -> object:
    answer = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, expr: str) -> list[dict]:
    data = api(url, "query", query=expr)
    assert data["resultType"] == "vector", (expr, data)
    return data["result"]


@pytest.mark.slow
def test_real_prometheus_answers_every_panel_and_evaluates_every_rule(tmp_path: Path) -> None:
    with ExitStack() as stack:
        servers = [stack.enter_context(fake_server()) for _ in range(2)]
        for server in servers:
            send_traffic(server)
        targets = [f"127.0.0.1:{server.port}" for server in servers]
        url = stack.enter_context(running_prometheus(tmp_path, targets))

        def both_up() -> bool:
            active = api(url, "targets", state="active")["activeTargets"]
            return sorted(t["labels"]["instance"] for t in active if t["health"] == "up") == sorted(targets)

        wait_for(both_up, "both instances scraped")
        for server in servers:  # traffic between scrapes: the rates move
            send_traffic(server)

        def rate_seen() -> bool:
            rows = query(url, 'sum(rate(reranker_requests_total{job="reranker"}[30s])) > 0')
            return len(rows) == 1

        wait_for(rate_seen, "a request rate above 0")
        # the dashboard's instance variable lists both instances
        instances = api(url, "label/instance/values", **{"match[]": 'reranker_ready{job="reranker"}'})
        assert sorted(instances) == sorted(targets)
        for title, expr in panel_queries():
            wait_for(lambda expr=expr: bool(query(url, expr)), f"data for panel {title!r}: {expr}", 30)

        def counted() -> dict[str, float]:
            rows = query(url, 'sum by (instance) (reranker_requests_total{job="reranker"})')
            return {row["metric"]["instance"]: float(row["value"][1]) for row in rows}

        wait_for(lambda: counted() == dict.fromkeys(targets, 14.0), "7 requests twice, on each instance")

        names = {rule["alert"] for rule in rules()}

        def evaluated() -> list[dict]:
            groups = api(url, "rules", type="alert")["groups"]
            return [rule for group in groups for rule in group["rules"]]

        wait_for(lambda: {r["name"] for r in evaluated() if r["health"] == "ok"} == names, "rules evaluated")
        loaded = evaluated()
        assert sorted(rule["name"] for rule in loaded) == sorted(names)
        assert all(rule["lastError"] == "" for rule in loaded if "lastError" in rule)
        assert [rule["name"] for rule in loaded if rule["state"] != "inactive"] == []  # a healthy fleet
