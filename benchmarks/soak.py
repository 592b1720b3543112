"""Soak: 20,000 requests from 8 clients, valid and invalid mixed; does the server's memory settle?

    .venv/bin/python -m benchmarks.soak [--requests 20000] [--clients 8] [--invalid-share 0.3]

Starts ``python -m reranker`` on the embedded model (default settings, so BACKEND=auto),
sends rerank / v1 rerank / embed / OpenAI embeddings requests with 1-8 short texts and,
among them, malformed JSON, schema violations, over-limit bodies and unknown routes.
Prints the server's RSS (from /proc) after warm-up (the first 10%), at the middle and at
the end, and the growth after warm-up; the goal is under 10%. Also the status counts:
any 5xx is a failure (exit 1).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter

import httpx

from benchmarks.common import load_passages_and_queries, server_process


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def request_plan(count: int, invalid_share: float, seed: int = 0) -> list[tuple[str, str, object]]:
    """(path, kind, body): kind "json" sends body as JSON, "raw" sends bytes as they are."""
    rng = random.Random(seed)
    passages, queries = load_passages_and_queries()
    passages = [p[:400] for p in passages]
    invalid = [
        ("/rerank", "raw", b'{"query": "q", "documents": ['),
        ("/rerank", "json", {"query": "", "documents": ["a"]}),
        ("/v1/rerank", "json", {"query": "q", "documents": [{"title": "no text"}]}),
        ("/rerank", "json", {"query": "q", "documents": ["d"] * 2000}),
        ("/v1/embeddings", "json", {"input": []}),
        ("/embed", "json", {"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "x"}] * 2}),
        ("/rerank", "raw", b"\xff\xfe not json"),
        ("/nowhere", "json", {}),
        ("/v1/rerank", "json", {"query": "q", "documents": ["d"], "top_n": -1}),
    ]
    plan = []
    for _ in range(count):
        if rng.random() < invalid_share:
            plan.append(rng.choice(invalid))
            continue
        texts = rng.sample(passages, rng.randint(1, 8))
        query = rng.choice(queries)
        plan.append(
            rng.choice(
                [
                    ("/rerank", "json", {"query": query, "documents": texts}),
                    ("/v1/rerank", "json", {"query": query, "documents": texts, "top_n": 3}),
                    ("/v1/embeddings", "json", {"input": texts}),
                    (
                        "/embed",
                        "json",
                        {
                            "batch_id": "s",
                            "chunks": [{"chunk_id": str(i), "content": t} for i, t in enumerate(texts)],
                        },
                    ),
                ]
            )
        )
    return plan


def chunks(texts: list[str]) -> list[dict[str, str]]:
    return [{"chunk_id": str(i), "content": text} for i, text in enumerate(texts)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--invalid-share", type=float, default=0.3)
    args = parser.parse_args()
    plan = request_plan(args.requests, args.invalid_share)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    next_index = 0
    marks = {max(1, args.requests // 10): "after warm-up", args.requests // 2: "middle", args.requests: "end"}
    rss: dict[str, float] = {}

    with server_process({"MAX_QUEUE_SIZE": "256"}) as (url, pid):
        with httpx.Client(base_url=url) as probe:
            model = probe.get("/health").json()["model"]
        print(f"server PID {pid}: {model['backend']} {model['dtype']} ({model['selected_because']})")
        rss["start"] = rss_mib(pid)

        def client() -> None:
            nonlocal next_index
            with httpx.Client(base_url=url, timeout=120) as http:
                while True:
                    with lock:
                        if next_index >= len(plan):
                            return
                        index = next_index
                        next_index += 1
                    path, kind, body = plan[index]
                    if kind == "raw":
                        response = http.post(path, content=body, headers={"content-type": "application/json"})
                    else:
                        response = http.post(path, json=body)
                    with lock:
                        statuses[response.status_code] += 1
                        done = sum(statuses.values())
                        if done in marks:
                            rss[marks[done]] = rss_mib(pid)

        started = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(args.clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - started

    rate = args.requests / seconds
    print(f"{args.requests} requests from {args.clients} clients in {seconds:.0f} s ({rate:.0f}/s)")
    print("statuses:", dict(sorted(statuses.items())))
    for label in ("start", "after warm-up", "middle", "end"):
        print(f"RSS {label:<14} {rss[label]:8.1f} MiB")
    growth = (rss["end"] - rss["after warm-up"]) / rss["after warm-up"] * 100
    print(f"RSS growth after warm-up: {growth:+.1f}% (goal: under 10%)")
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    return 1 if server_errors or growth >= 10 else 0


if __name__ == "__main__":
    sys.exit(main())
