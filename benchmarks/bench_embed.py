"""One very large /embed request vs the same texts embedded in-process.

    .venv/bin/python -m benchmarks.bench_embed [--chunks 10000] [--batch-size 32]

Prints wall time, texts/s and the server's peak RSS (sampled every 50 ms) against its
configured memory limit (EMBEDDING_MAX_MEMORY_PERCENT of physical memory).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import httpx
import psutil

from benchmarks.common import load_passages_and_queries, running_server


def make_chunks(count: int) -> list[str]:
    passages, _ = load_passages_and_queries()
    return [f"{passages[i % len(passages)]} (part {i // len(passages)})" for i in range(count)]


def in_process(texts: list[str], batch_size: int) -> float:
    from sentence_transformers import SentenceTransformer

    from reranker.backends.source import embedded_model_path

    model = SentenceTransformer(str(embedded_model_path()), device="cpu").eval()
    model.encode(texts[:batch_size], batch_size=batch_size)
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size)
    return time.perf_counter() - started


class PeakRss:
    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-percent", type=float, default=70.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = make_chunks(args.chunks)
    body = {"batch_id": "bench", "chunks": [{"chunk_id": str(i), "content": t} for i, t in enumerate(texts)]}

    seconds = in_process(texts, args.batch_size)
    print(f"{args.chunks} chunks, batch size {args.batch_size}")
    print(f"in-process (sentence-transformers): {seconds:8.1f} s  {args.chunks / seconds:8.1f} texts/s")
    env = {
        "BATCH_SIZE": str(args.batch_size),
        "EMBEDDING_MAX_MEMORY_PERCENT": str(args.memory_percent),
        "REQUEST_TIMEOUT_S": "3600",  # one request of 10,000 texts takes minutes on a CPU
    }
    with running_server(env) as url:
        pid = next(
            c.pid
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == int(url.rsplit(":", 1)[1])
        )
        httpx.post(f"{url}/embed", json={"batch_id": "warm", "chunks": body["chunks"][:64]}, timeout=60)
        with PeakRss(pid) as rss:
            baseline = rss.peak
            started = time.perf_counter()
            response = httpx.post(f"{url}/embed", json=body, timeout=3600)
            wall = time.perf_counter() - started
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()["vectors"]) == args.chunks
    total = psutil.virtual_memory().total
    limit = total * args.memory_percent / 100
    print(f"server /embed (one request):         {wall:8.1f} s  {args.chunks / wall:8.1f} texts/s")
    print(f"server/in-process throughput: {seconds / wall:.2f}x")
    print(
        f"server RSS: {baseline / 2**20:.0f} MiB before, {rss.peak / 2**20:.0f} MiB peak; "
        f"limit {limit / 2**30:.1f} GiB ({args.memory_percent:g}% of {total / 2**30:.1f} GiB)"
    )


if __name__ == "__main__":
    main()
