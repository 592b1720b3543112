"""Rerank throughput: the model in-process vs the server with 1 and 16 concurrent clients.

    .venv/bin/python -m benchmarks.bench_rerank [--requests 200] [--docs 8] [--batch-size 32]

Items are documents scored. In-process runs the same computation the server does for
the embedded bi-encoder (embed query + documents, cosine) in batches of --batch-size.
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
import numpy as np

from benchmarks.common import HEADER, drive, make_requests, row, running_server


def in_process(requests: list[dict], batch_size: int) -> tuple[float, list[float]]:
    from sentence_transformers import SentenceTransformer

    from reranker.backends.source import embedded_model_path

    model = SentenceTransformer(str(embedded_model_path()), device="cpu").eval()
    model.encode(["warm up"] * batch_size, batch_size=batch_size)
    texts = [t for r in requests for t in (r["query"], *r["documents"])]
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    throughput = sum(len(r["documents"]) for r in requests) / (time.perf_counter() - started)
    latencies = []
    for r in requests[:50]:
        started = time.perf_counter()
        vectors = model.encode(
            [r["query"], *r["documents"]], batch_size=batch_size, normalize_embeddings=True
        )
        _ = vectors[1:] @ vectors[0]
        latencies.append((time.perf_counter() - started) * 1000)
    return throughput, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    requests = make_requests(args.requests, args.docs)

    print(f"{args.requests} requests x {args.docs} documents, batch size {args.batch_size}")
    print(HEADER)
    ceiling, latencies = in_process(requests, args.batch_size)
    print(
        row(
            "in-process (sentence-transformers)",
            ceiling,
            np.percentile(latencies, 50),
            np.percentile(latencies, 95),
        )
    )
    with running_server({"BATCH_SIZE": str(args.batch_size)}) as url:
        drive(url, "/rerank", requests[:20], 4)  # warm up
        for clients in (1, 16):
            before = httpx.get(f"{url}/metrics").json()
            result = drive(url, "/rerank", requests, clients)
            after = httpx.get(f"{url}/metrics").json()
            batches = after["batches_run"] - before["batches_run"]
            mean_batch = (after["items_processed"] - before["items_processed"]) / max(batches, 1)
            padding = (after["real_tokens"] - before["real_tokens"]) / max(
                after["padded_tokens"] - before["padded_tokens"], 1
            )
            ratio = (
                f"{result.items_per_s / ceiling:.2f}x in-process, {result.failures} failed, "
                f"mean batch {mean_batch:.1f}, padding efficiency {padding:.2f}"
            )
            print(
                row(
                    f"server, {clients} client(s)",
                    result.items_per_s,
                    result.percentile(50),
                    result.percentile(95),
                    ratio,
                )
            )


if __name__ == "__main__":
    main()
