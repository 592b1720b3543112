"""A real ``redis-server`` on a free loopback port, in a temporary directory, without persistence."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.scripts import free_ports, require_tool

READY_TIMEOUT_S = 30.0


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, durable: bool = False) -> None:
        """``durable``: every write in the append-only file, fsynced (a restart loses nothing)."""
        self.executable = require_tool("redis-server")
        self.durable = durable
        self.directory = directory
        self.port = port or free_ports(1)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it (again, on the same port after ``kill``) and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def kill(self) -> None:
        """SIGKILL: what a crashed or lost Redis looks like to the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.kill()
