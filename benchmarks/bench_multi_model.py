"""An embedder and a reranker: one server (MODELS) against two servers, one model each.

The RAG workload: each request embeds one query (``/v1/embeddings``) then reranks 50 passages
of the shared TREC-DL19 subset (``/v1/rerank``), ``--clients`` at a time. Prints resident memory
(the processes' RSS after start-up), RAG requests per second and the p50/p95 of one whole request.
The embedder is the embedded all-MiniLM-L6-v2; the reranker is a MiniLM-sized cross-encoder built
from its weights (random head: timing only). Both setups get the same CPUs and settings.

    python -m benchmarks.bench_multi_model --requests 60 --clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import psutil

from benchmarks.common import load_average, make_requests, server_process
from reranker.backends.source import embedded_model_path


def build_cross_encoder(target: Path) -> Path:
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(1234)
    CrossEncoder(str(embedded_model_path()), num_labels=1, device="cpu").save(str(target))
    return target


async def rag(embed_url: str, rerank_url: str, bodies: list[dict], clients: int) -> tuple[float, list[float]]:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=2 * clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                embedded = await client.post(
                    f"{embed_url}/v1/embeddings", json={"model": "embed", "input": body["query"]}
                )
                ranked = await client.post(f"{rerank_url}/v1/rerank", json={"model": "rerank", **body})
                if embedded.status_code != 200 or ranked.status_code != 200:
                    raise RuntimeError(f"{embedded.status_code} {ranked.status_code}: {ranked.text[:200]}")
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, latencies


def rss_mib(pids: list[int]) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def measure(label: str, urls: tuple[str, str], pids: list[int], args: argparse.Namespace) -> str:
    bodies = make_requests(args.requests, 50, seed=1)
    asyncio.run(rag(*urls, bodies[:4], 2))  # warm
    seconds, latencies = asyncio.run(rag(*urls, bodies, args.clients))
    return (
        f"{label:<34} {rss_mib(pids):>9.0f} {len(bodies) / seconds:>10.2f} "
        f"{np.percentile(latencies, 50):>9.0f} {np.percentile(latencies, 95):>9.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    common = {"BACKEND": "torch", "DTYPE": os.environ.get("DTYPE", "auto"), "MAX_QUEUE_SIZE": "1024"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cross = build_cross_encoder(Path(tmp) / "cross")
        embedder = str(embedded_model_path())
        with server_process({**common, "MODELS": f"embed={embedder},rerank={cross}"}) as (url, pid):
            rows.append(measure("one server, MODELS=embed,rerank", (url, url), [pid], args))
        with ExitStack() as stack:
            embed_url, embed_pid = stack.enter_context(server_process({**common, "MODEL_NAME": embedder}))
            rerank_url, rerank_pid = stack.enter_context(
                server_process({**common, "LOCAL_MODEL_PATH": str(cross)})
            )
            rows.append(
                measure("two servers, one model each", (embed_url, rerank_url), [embed_pid, rerank_pid], args)
            )
    workload = f"{args.requests} RAG requests (1 query embed + 50-passage rerank)"
    print(f"# {workload}, {args.clients} clients; {load_average()}")
    print(f"{'setup':<34} {'RSS MiB':>9} {'RAG req/s':>10} {'p50 ms':>9} {'p95 ms':>9}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
