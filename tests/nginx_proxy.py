"""A real nginx running the shipped nginx/reranker.conf on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.scripts import REPO_ROOT, free_ports, require_tool, run_script, wait_for


def nginx_config(tmp: Path, listen_port: int, upstream: str) -> Path:
    """A main nginx.conf that includes the shipped server block (listening on ``listen_port``)
    and ``upstream`` (what nginx/generate_upstream.sh prints), everything else under ``tmp``."""
    shipped = (REPO_ROOT / "nginx" / "reranker.conf").read_text()
    assert shipped.count("listen 8080;") == 1
    (tmp / "reranker_upstream.conf").write_text(upstream)
    (tmp / "reranker.conf").write_text(shipped.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};"))
    user = "user root root;\n" if os.geteuid() == 0 else ""
    main = f"""{user}daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/reranker_upstream.conf;
    include {tmp}/reranker.conf;
}}
"""
    path = tmp / "nginx.conf"
    path.write_text(main)
    return path


@contextmanager
def running_nginx(tmp: Path, upstream: str, ready_path: str | None = "/health") -> Iterator[str]:
    """nginx with the shipped config in front of ``upstream``; yields its URL once ``ready_path``
    answers 200 through it (with ``ready_path=None``: once nginx accepts connections)."""
    nginx = require_tool("nginx")
    port = free_ports(1)
    config = nginx_config(tmp, port, upstream)
    checked = subprocess.run([nginx, "-t", "-c", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([nginx, "-c", str(config)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if ready_path is None:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0
        try:
            return httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, "nginx answering")
        yield url
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=30)


@contextmanager
def managed_cluster(count: int, env: dict[str, str], *options: str) -> Iterator[None]:
    """``manage_reranker.sh cluster-start count`` (stopped again on exit)."""
    started = run_script("manage_reranker.sh", "cluster-start", str(count), *options, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield
    finally:
        run_script("manage_reranker.sh", "cluster-stop", env=env)


@contextmanager
def nginx_in_front(count: int, base_port: int, env: dict[str, str], tmp: Path) -> Iterator[str]:
    """The shipped nginx config over ``count`` instances from ``base_port``: its base URL."""
    upstream = run_script("nginx/generate_upstream.sh", str(count), str(base_port), env=env)
    assert upstream.returncode == 0, upstream.stderr
    with running_nginx(tmp, upstream.stdout) as url:
        yield url
