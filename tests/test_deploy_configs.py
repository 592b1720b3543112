"""The shipped deployment files pass their own tools' checks and agree with the server's defaults."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from reranker.settings import Settings
from tests.nginx_proxy import running_nginx
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


def kube_documents(name: str) -> dict[tuple[str, str], dict]:
    import yaml

    documents = yaml.safe_load_all((REPO_ROOT / "deploy" / "kubernetes" / name).read_text())
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}


def test_gpu_deployment_asks_for_one_gpu_and_probes_as_the_cpu_one() -> None:
    cpu = kube_documents("deployment.yaml")[("Deployment", "reranker")]["spec"]["template"]
    gpu_files = kube_documents("deployment-gpu.yaml")
    gpu = gpu_files[("Deployment", "reranker-gpu")]["spec"]["template"]
    (cpu_box,), (gpu_box,) = cpu["spec"]["containers"], gpu["spec"]["containers"]
    assert gpu_box["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["nodeSelector"] and "nvidia.com/gpu" in gpu["spec"]["nodeSelector"].popitem()[0]
    assert [t["key"] for t in gpu["spec"]["tolerations"]] == ["nvidia.com/gpu"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert gpu_box[probe] == cpu_box[probe], probe
    window = {
        name: box["startupProbe"]["periodSeconds"] * box["startupProbe"]["failureThreshold"]
        for name, box in (("cpu", cpu_box), ("gpu", gpu_box))
    }
    assert window["gpu"] >= 600 and window["gpu"] > window["cpu"], window  # a big model loads slowly
    assert gpu_box["startupProbe"]["httpGet"] == cpu_box["startupProbe"]["httpGet"]
    for same in ("terminationGracePeriodSeconds", "securityContext"):
        assert gpu["spec"][same] == cpu["spec"][same], same
    for same in ("envFrom", "securityContext", "lifecycle", "ports"):
        assert gpu_box[same] == cpu_box[same], same
    env = {item["name"]: item["value"] for item in gpu_box["env"]}
    assert env["DTYPE"] == "auto" and env["DEVICE_PREFERENCE"] == "cuda"
    assert gpu_box["image"].endswith("-cuda")
    # its own Service, and the CPU Service does not route to GPU pods
    pods = gpu["metadata"]["labels"]
    assert gpu_files[("Service", "reranker-gpu")]["spec"]["selector"].items() <= pods.items()
    cpu_service = kube_documents("service.yaml")[("Service", "reranker")]["spec"]["selector"]
    assert not cpu_service.items() <= pods.items()


def dockerfile(name: str) -> dict[str, list[str]]:
    """A Dockerfile's instructions by keyword (continuation lines joined), in order."""
    found: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", (REPO_ROOT / "deploy" / name).read_text())
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


def test_cuda_image_runs_as_the_cpu_image_with_the_pinned_cuda_torch() -> None:
    cpu, cuda = dockerfile("Dockerfile"), dockerfile("Dockerfile.cuda")
    for same in ("USER", "STOPSIGNAL", "CMD", "ENTRYPOINT", "EXPOSE", "WORKDIR"):
        assert cuda.get(same) == cpu.get(same), same
    assert cpu["STOPSIGNAL"] == ["SIGTERM"] and cpu["CMD"] == ['["python", "-m", "reranker"]']
    for image in (cpu, cuda):  # the same health check command; the start period may differ
        (check,) = image["HEALTHCHECK"]
        assert "/livez" in check
    assert cuda["HEALTHCHECK"][0].split(" CMD ")[1] == cpu["HEALTHCHECK"][0].split(" CMD ")[1]
    useradd = [[run for run in image["RUN"] if run.startswith("useradd")] for image in (cpu, cuda)]
    assert useradd[0] == useradd[1] and len(useradd[0]) == 1
    uid = int(re.search(r"--uid (\d+)", useradd[0][0]).group(1))
    assert cpu["USER"] == [str(uid)]
    for manifest, name in (("deployment.yaml", "reranker"), ("deployment-gpu.yaml", "reranker-gpu")):
        pod = kube_documents(manifest)[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == uid, manifest
    torch_pin = re.search(r"^torch==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(1)
    installs = {
        label: next(run for run in image["RUN"] if "torch==" in run)
        for label, image in (("cpu", cpu), ("cuda", cuda))
    }
    for label, run in installs.items():
        assert re.search(r"torch==(\S+)", run).group(1) == torch_pin, label
    assert "download.pytorch.org/whl/cpu" in installs["cpu"]
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ ", installs["cuda"])
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-runtime-ubuntu[\d.]+", cuda["FROM"][0])
    assert "python3.11" in " ".join(cuda["RUN"])
    assert re.search(r"\bDTYPE=auto\b", " ".join(cuda["ENV"]))


def test_every_multi_instance_deployment_shares_its_jobs_through_redis() -> None:
    """Kubernetes (2+ replicas) and the systemd template (one unit per port) use JOB_BACKEND=redis
    with a REDIS_URL that reaches the Redis they ship or name; the single-instance unit does not."""
    import yaml

    kube = REPO_ROOT / "deploy" / "kubernetes"
    documents = [doc for path in sorted(kube.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    by_kind_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    replicas = by_kind_name[("Deployment", "reranker")]["spec"]["replicas"]
    min_replicas = by_kind_name[("HorizontalPodAutoscaler", "reranker")]["spec"]["minReplicas"]
    assert min(replicas, min_replicas) >= 2
    config = by_kind_name[("ConfigMap", "reranker-config")]["data"]
    assert config["JOB_BACKEND"] == "redis"
    redis_url = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", config["REDIS_URL"])
    assert redis_url, config["REDIS_URL"]
    service = by_kind_name[("Service", redis_url.group(1))]
    assert [port["port"] for port in service["spec"]["ports"]] == [int(redis_url.group(2))]
    redis_pods = by_kind_name[("Deployment", "reranker-redis")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= redis_pods.items()
    assert (
        "--maxmemory-policy"
        in by_kind_name[("Deployment", "reranker-redis")]["spec"]["template"]["spec"]["containers"][0]["args"]
    )

    template = unit_settings((REPO_ROOT / "reranker@.service").read_text())
    environment = " ".join(template["Environment"])
    assert "JOB_BACKEND=redis" in environment and "REDIS_URL=redis://127.0.0.1:6379/0" in environment
    assert "redis-server.service" in template["After"][0] and "redis-server.service" in template["Wants"][0]
    single = " ".join(unit_settings((REPO_ROOT / "reranker.service").read_text())["Environment"])
    assert "JOB_BACKEND" not in single  # one instance: the default local store


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


# --- nginx and the job routes ----------------------------------------------------------------
JOB_MODULES = ("reranker.api.jobs", "reranker.api.runpod")
SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_server_block() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The live (uncommented) server block of nginx/reranker.conf: its own directives, and each
    location's, by the location's match (``/``, ``= /run``, ``^~ /cancel/``, ``~ ^/(health)$``)."""
    server: dict[str, str] = {}
    locations: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    inside = False
    for raw in (REPO_ROOT / "nginx" / "reranker.conf").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line == "server {":
            inside = True
        elif inside and line.startswith("location ") and line.endswith("{"):
            current = locations.setdefault(line.removeprefix("location ").removesuffix("{").strip(), {})
        elif inside and line == "}":
            if current is None:
                break
            current = None
        elif inside and line:
            name, _, value = line.rstrip(";").partition(" ")
            (server if current is None else current)[name] = value.strip()
    return server, locations


def nginx_directives_for(path: str) -> dict[str, str]:
    """What nginx applies to a request for ``path``: the location it picks (exact, then the
    longest prefix, which ``^~`` makes final, else the first matching regex) over the server's."""
    server, locations = nginx_server_block()
    chosen = f"= {path}" if f"= {path}" in locations else None
    if chosen is None:
        prefixes = [name for name in locations if not name.startswith(("=", "~"))]
        matching = [name for name in prefixes if path.startswith(name.removeprefix("^~ "))]
        chosen = max(matching, key=lambda name: len(name.removeprefix("^~ ")), default=None)
        if chosen is None or not chosen.startswith("^~ "):
            regexes = [name for name in locations if name.startswith("~")]
            chosen = next((n for n in regexes if re.search(n.split(None, 1)[1], path)), chosen)
    assert chosen is not None, f"no nginx location serves {path}"
    return {**server, **locations[chosen]}


def nginx_bytes(size: str) -> int:
    return int(size[:-1]) * SIZE_UNITS[size[-1].lower()] if size[-1].isalpha() else int(size)


def routes(method: str, job_routes: bool) -> list[str]:
    """Paths of the server's ``method`` routes that are (or are not) job routes, ``{id}`` filled in."""
    from starlette.routing import Mount

    from reranker.api.app import ROUTES

    flat = [
        (entry.path + route.path, route)
        for entry in ROUTES
        if isinstance(entry, Mount)
        for route in entry.routes
    ] + [(entry.path, entry) for entry in ROUTES if not isinstance(entry, Mount)]
    return [
        re.sub(r"\{\w+\}", "some-id", path)
        for path, route in flat
        if method in (route.methods or ()) and (route.endpoint.__module__ in JOB_MODULES) == job_routes
    ]


def test_nginx_never_retries_a_job_post_an_instance_received() -> None:
    job_posts = routes("POST", job_routes=True)
    assert sorted(job_posts) == [
        "/cancel/some-id",
        "/models/some-id/run",
        "/models/some-id/runsync",
        "/models/some-id/v1/jobs",
        "/run",
        "/runsync",
        "/v1/jobs",
    ]
    for path in job_posts:
        retry_on = nginx_directives_for(path)["proxy_next_upstream"].split()
        assert "non_idempotent" not in retry_on, path
        assert retry_on[:2] == ["error", "timeout"], path  # an instance that is down is still skipped
    for path in ("/rerank", "/embed", "/v1/rerank", "/v1/embeddings"):  # no side effects: retried
        assert "non_idempotent" in nginx_directives_for(path)["proxy_next_upstream"].split(), path
    for path in routes("GET", job_routes=True):  # status reads fail over
        assert nginx_directives_for(path)["proxy_next_upstream"].split()[:2] == ["error", "timeout"]


def test_nginx_body_limits_are_the_server_limits_route_by_route() -> None:
    job_limit = Settings.model_fields["max_job_request_bytes"].default
    request_limit = Settings.model_fields["max_request_bytes"].default
    submissions = [path for path in routes("POST", job_routes=True) if not path.startswith("/cancel/")]
    for path in submissions:
        assert nginx_bytes(nginx_directives_for(path)["client_max_body_size"]) == job_limit, path
    for path in routes("POST", job_routes=False):
        assert nginx_bytes(nginx_directives_for(path)["client_max_body_size"]) == request_limit, path


def test_nginx_waits_longer_than_runsync_does() -> None:
    """/runsync holds its answer up to RUNSYNC_WAIT_S; nginx must not cut it with a 504 first."""
    wait_s = Settings.model_fields["runsync_wait_s"].default
    read_timeout = nginx_directives_for("/runsync")["proxy_read_timeout"]
    assert int(read_timeout.removesuffix("s")) > wait_s
    default_timeout = nginx_directives_for("/rerank")["proxy_read_timeout"]
    assert int(default_timeout.removesuffix("s")) > Settings.model_fields["request_timeout_s"].default


@contextmanager
def black_hole(arrivals: list[str]) -> Iterator[int]:
    """A port that reads each request's first line into ``arrivals`` and then hangs up unanswered
    (an instance that dies with the request in hand, as far as nginx can tell)."""
    listener = socket.create_server(("127.0.0.1", 0))
    lock = threading.Lock()

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                head = b""
                while b"\r\n" not in head and (chunk := connection.recv(4096)):
                    head += chunk
                if head:
                    with lock:
                        arrivals.append(head.split(b"\r\n", 1)[0].decode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(timeout=10)


def test_real_nginx_replays_a_request_but_never_a_job_submission(tmp_path: Path) -> None:
    """Two instances that take a request and hang up: nginx hands a rerank or a status read to
    the other one, but a job POST that reached one is answered 502, not submitted twice."""
    arrivals: list[str] = []
    with black_hole(arrivals) as first, black_hole(arrivals) as second:
        env = script_env(tmp_path, first, MAX_FAILS="0")  # every request tries both, none is benched
        addresses = [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]
        upstream = run_script("nginx/generate_upstream.sh", *addresses, env=env)
        assert upstream.returncode == 0
        with running_nginx(tmp_path, upstream.stdout, ready_path=None) as url:
            sent = {
                "POST /rerank": 2,
                "GET /status/some-id": 2,
                "POST /v1/jobs": 1,
                "POST /run": 1,
                "POST /runsync": 1,
                "POST /cancel/some-id": 1,
            }
            for request, expected in sent.items():
                method, path = request.split()
                del arrivals[:]
                response = httpx.request(method, url + path, json={"input": {}}, timeout=30)
                assert response.status_code == 502, request
                assert [line.rsplit(" ", 1)[0] for line in arrivals] == [request] * expected
