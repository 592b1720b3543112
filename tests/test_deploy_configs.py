"""The shipped deployment files pass their own tools' checks and agree with the server's defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reranker.settings import Settings
from tests.scripts import REPO_ROOT, require_tool, run_script, script_env

DRAIN_S = Settings.model_fields["shutdown_timeout_s"].default
UNITS = ("reranker.service", "reranker@.service")


def unit_settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_verifies_and_is_hardened(unit: str, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    text = (REPO_ROOT / unit).read_text()
    # verify checks that ExecStart exists: point the install path at this checkout's virtualenv.
    (tmp_path / unit).write_text(text.replace("/opt/reranker", str(REPO_ROOT)))
    target = tmp_path / unit.replace("@.", "@8001.")
    result = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True)
    assert (result.returncode, result.stderr.strip()) == (0, ""), result.stderr  # warnings count too
    settings = unit_settings(text)
    assert settings["User"] != ["root"] and settings["User"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert int(settings["TimeoutStopSec"][0]) > DRAIN_S
    assert settings["Restart"] == ["on-failure"]
    assert any(path.lstrip("-").startswith("/etc/reranker/") for path in settings["EnvironmentFile"])
    for hardening in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert settings[hardening] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["StandardOutput"] == ["journal"]


def test_template_unit_takes_its_port_from_the_instance_name() -> None:
    exec_start = unit_settings((REPO_ROOT / "reranker@.service").read_text())["ExecStart"]
    assert exec_start[0].endswith("-m reranker --port %i")


def test_kubernetes_manifests_validate_and_probe_the_right_endpoints() -> None:
    validate = require_tool_in_venv("kubernetes-validate")
    manifests = sorted(str(p) for p in (REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    result = subprocess.run([validate, "--strict", "--quiet", *manifests], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    deployment = (REPO_ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text()
    assert re.search(r"readinessProbe:.*?path: /readyz", deployment, re.S)
    assert re.search(r"livenessProbe:.*?path: /livez", deployment, re.S)
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", deployment).group(1))
    assert grace > DRAIN_S
    kinds = {re.search(r"^kind: (\w+)", Path(m).read_text(), re.M).group(1) for m in manifests}
    assert kinds == {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler"}


def test_upstream_for_several_hosts_passes_nginx_config_test(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    env = script_env(tmp_path, 8000)
    upstream = run_script("nginx/generate_upstream.sh", "10.0.0.5:8000", "10.0.0.6:8001", env=env)
    assert upstream.returncode == 0
    assert "server 10.0.0.5:8000 max_fails=3" in upstream.stdout and "least_conn;" in upstream.stdout
    assert run_script("nginx/generate_upstream.sh", "not-an-address", env=env).returncode == 2
    shipped = (REPO_ROOT / "nginx" / "reranker.conf").read_text()
    server_block = shipped.replace("listen 8080;", "listen 127.0.0.1:1;")
    (tmp_path / "upstream.conf").write_text(upstream.stdout)
    (tmp_path / "reranker.conf").write_text(server_block)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
        f"http {{ include {tmp_path}/reranker.conf; include {tmp_path}/upstream.conf; }}\n"
    )
    config = tmp_path / "nginx.conf"
    checked = subprocess.run([nginx, "-t", "-c", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_nginx_body_limit_matches_the_server_limit() -> None:
    config = (REPO_ROOT / "nginx" / "reranker.conf").read_text()
    limit_mb = int(re.search(r"^\s*client_max_body_size (\d+)m;", config, re.M).group(1))
    assert limit_mb * 1024 * 1024 == Settings.model_fields["max_request_bytes"].default


def require_tool_in_venv(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        pytest.skip(f"{name} is not installed (requirements-dev.txt has it)")
    return str(candidate)
