"""The job path vs /embed on one instance: the same texts, the same server, turn by turn.

    .venv/bin/python -m benchmarks.bench_jobs [--job-backend local|redis] [--chunks 3000] [--rounds 3]

With ``--job-backend redis`` a redis-server is started on a free port (no persistence)
unless ``--redis-url`` names one. Each round embeds the texts once through ``/embed`` (one
request) and once as a job (``POST /v1/jobs``, polled every 20 ms). Prints, per path, the
best and median texts/s; for jobs both the server's own span (``finished_at - created_at``)
and the client's (submission to the output in hand, which adds the polling and, with redis,
the output's round trip through Redis); the ratio job/embed (the issue's bar: >= 0.9x); and
submission-to-first-batch latency: the server's ``started_at - created_at`` (the worker
took the job) and the first status read showing progress (the first slice done).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import redis

from benchmarks.bench_embed import make_chunks
from benchmarks.common import free_port, server_process


@contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if redis.Redis(port=port).ping():
                        break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            process.kill()
            process.wait()


def embed_once(client: httpx.Client, body: dict) -> float:
    started = time.perf_counter()
    response = client.post("/embed", json=body)
    response.raise_for_status()
    assert len(response.json()["vectors"]) == len(body["chunks"])
    return time.perf_counter() - started


def job_once(client: httpx.Client, body: dict) -> dict[str, float]:
    submitted = time.perf_counter()
    accepted = client.post("/v1/jobs", json={"type": "embed", "input": body})
    accepted.raise_for_status()
    status_url = accepted.json()["status_url"]
    first_progress = None
    while True:
        view = client.get(status_url).json()
        if first_progress is None and view["progress"]["done"] > 0:
            first_progress = time.perf_counter() - submitted
        if view["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.02)
    client_s = time.perf_counter() - submitted
    assert view["status"] == "COMPLETED", view
    assert len(view["output"]["vectors"]) == len(body["chunks"])
    return {
        "server_s": view["finished_at"] - view["created_at"],
        "client_s": client_s,
        "pickup_s": view["started_at"] - view["created_at"],
        "first_progress_s": first_progress if first_progress is not None else client_s,
    }


def rate(count: int, seconds: list[float]) -> str:
    rates = [count / s for s in seconds]
    return f"best {max(rates):7.1f} texts/s, median {statistics.median(rates):7.1f} texts/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-backend", choices=["local", "redis"], default="local")
    parser.add_argument("--redis-url", default=None, help="an existing Redis (default: start one)")
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    texts = make_chunks(args.chunks)
    body = {"batch_id": "bench", "chunks": [{"chunk_id": f"c{i}", "content": t} for i, t in enumerate(texts)]}
    with redis_for(args) as redis_url:
        # One /embed of all the texts: never refused on its time estimate (a busy machine is slow).
        env = {
            "JOB_BACKEND": args.job_backend,
            "BATCH_SIZE": str(args.batch_size),
            "MAX_REQUEST_SECONDS": "0",
        }
        if redis_url:
            env["REDIS_URL"] = redis_url
        with server_process(env) as (url, _), httpx.Client(base_url=url, timeout=600) as client:
            embed_once(client, {"batch_id": "warm", "chunks": body["chunks"][:64]})
            embeds, jobs = [], []
            for _ in range(args.rounds):  # alternate, so load from elsewhere hits both alike
                embeds.append(embed_once(client, body))
                jobs.append(job_once(client, body))
    count = args.chunks
    server_s = [job["server_s"] for job in jobs]
    client_s = [job["client_s"] for job in jobs]
    print(
        f"JOB_BACKEND={args.job_backend}, {count} chunks, BATCH_SIZE={args.batch_size}, {args.rounds} rounds"
    )
    print(f"/embed (one request)           {rate(count, embeds)}")
    print(f"job, server span               {rate(count, server_s)}")
    print(f"job, client span               {rate(count, client_s)}")
    median = statistics.median
    print(
        f"job/embed ratio (best, median) server {min(embeds) / min(server_s):.3f} / "
        f"{median(embeds) / median(server_s):.3f}; "
        f"client {min(embeds) / min(client_s):.3f} / {median(embeds) / median(client_s):.3f}"
    )
    pickup = [job["pickup_s"] * 1000 for job in jobs]
    first = [job["first_progress_s"] * 1000 for job in jobs]
    print(f"submission -> worker took it   median {statistics.median(pickup):7.1f} ms (server started_at)")
    print(
        f"submission -> first slice done median {statistics.median(first):7.1f} ms (first read with progress)"
    )


@contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[str | None]:
    if args.job_backend != "redis":
        yield None
    elif args.redis_url:
        yield args.redis_url
    else:
        with redis_server() as url:
            yield url


if __name__ == "__main__":
    main()
