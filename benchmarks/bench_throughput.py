"""Throughput engine benchmark: in-process ceiling vs the server, cache, length grouping, NDCG@10.

    .venv/bin/python -m benchmarks.bench_throughput [--requests 160] [--docs 8] [--quick]

In one run, on the same texts (MS MARCO passages from ../shared/data when present):
1. the in-process ceiling: sentence-transformers encoding query + documents (what the
   server computes for the embedded bi-encoder), at batch sizes 8/16/32/64; the best counts;
2. the server (default settings) at 1, 4 and 16 concurrent clients, prediction cache off,
   then on (a cold pass and a second pass of the same requests): items/s, p50/p95, the
   ratio to the ceiling, cache hit rate;
3. mixed-length traffic (documents of 5 to 300 words), 16 clients, length grouping on vs
   BATCH_LENGTH_GROUPING=false;
4. rerank quality end to end: NDCG@10 over the judged queries of the TREC-DL19 subset,
   each query's candidate list (its judged passages plus 50 unjudged ones, fixed seed)
   ranked in-process and through the server's /v1/rerank (4 concurrent clients, cache off
   and on): the figures must agree to 4 decimals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import httpx
import numpy as np

from benchmarks.common import HEADER, SHARED_DATA, drive, make_requests, row, running_server

BATCH_SIZES = (8, 16, 32, 64)


def load_model():
    from sentence_transformers import SentenceTransformer

    from reranker.backends.source import embedded_model_path

    return SentenceTransformer(str(embedded_model_path()), device="cpu").eval()


def in_process_items_per_s(model, requests: list[dict], batch_size: int) -> float:
    texts = [t for r in requests for t in (r["query"], *r["documents"])]
    model.encode(texts[:64], batch_size=batch_size)  # warm up this batch size
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    assert len(vectors) == len(texts)
    return sum(len(r["documents"]) for r in requests) / seconds


def mixed_length_requests(count: int, docs: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    base = make_requests(count, docs, seed)
    words = " ".join(d for r in base for d in r["documents"]).split()
    out = []
    for r in base:
        documents = []
        for _ in range(docs):
            n = rng.randint(5, 300)
            start = rng.randrange(0, len(words) - n)
            documents.append(" ".join(words[start : start + n]))
        out.append({"query": r["query"], "documents": documents})
    return out


@dataclass
class Judged:
    """The graded set: each judged query's candidate passages and their grades."""

    corpus: dict[str, str]
    queries: dict[str, str]
    candidates: dict[str, list[str]]
    grades: dict[str, dict[str, int]]


def judged_set(seed: int = 0) -> Judged | None:
    if not (SHARED_DATA / "qrels" / "test.tsv").is_file():
        return None
    with open(SHARED_DATA / "corpus.jsonl", encoding="utf-8") as fh:
        corpus = {doc["_id"]: doc["text"] for doc in map(json.loads, fh)}
    with open(SHARED_DATA / "queries.jsonl", encoding="utf-8") as fh:
        queries = {q["_id"]: q["text"] for q in map(json.loads, fh)}
    grades: dict[str, dict[str, int]] = defaultdict(dict)
    with open(SHARED_DATA / "qrels" / "test.tsv", encoding="utf-8") as fh:
        for line in fh:
            qid, did, grade = line.rstrip("\n").split("\t")
            grades[qid][did] = int(grade)
    rng = random.Random(seed)
    all_ids = sorted(corpus)
    candidates = {}
    for qid in sorted(grades):
        judged = sorted(d for d in grades[qid] if d in corpus)
        candidates[qid] = judged + rng.sample([d for d in all_ids if d not in grades[qid]], 50)
    return Judged(corpus, {q: queries[q] for q in candidates}, candidates, dict(grades))


def ndcg_at_10(ranked: list[str], grades: dict[str, int]) -> float:
    dcg = sum(grades.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(grades.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def quality_in_process(model, judged: Judged) -> float:
    scores = []
    for qid, query in judged.queries.items():
        ids = judged.candidates[qid]
        texts = [query, *(judged.corpus[d] for d in ids)]
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
        sims = vectors[1:] @ vectors[0]
        order = sorted(range(len(ids)), key=lambda i: (-float(sims[i]), i))
        scores.append(ndcg_at_10([ids[i] for i in order], judged.grades[qid]))
    return float(np.mean(scores))


async def _quality_server(url: str, judged: Judged, clients: int) -> float:
    semaphore = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(qid: str) -> float:
            ids = judged.candidates[qid]
            documents = [judged.corpus[d] for d in ids]
            body = {"query": judged.queries[qid], "documents": documents, "model": "default"}
            async with semaphore:
                response = await client.post("/v1/rerank", json=body)
            response.raise_for_status()
            ranked = [ids[r["index"]] for r in response.json()["results"]]
            return ndcg_at_10(ranked, judged.grades[qid])

        return float(np.mean(await asyncio.gather(*(one(q) for q in judged.queries))))


def quality_server(url: str, judged: Judged, clients: int = 4) -> float:
    return asyncio.run(_quality_server(url, judged, clients))


def server_rows(url: str, requests: list[dict], ceiling: float, label: str, clients_list=(1, 4, 16)) -> None:
    for clients in clients_list:
        before = httpx.get(f"{url}/metrics").json()
        result = drive(url, "/rerank", requests, clients)
        after = httpx.get(f"{url}/metrics").json()
        batches = max(after["batches_run"] - before["batches_run"], 1)
        mean_batch = (after["items_processed"] - before["items_processed"]) / batches
        extra = f"{result.items_per_s / ceiling:.2f}x in-process, mean batch {mean_batch:.1f}"
        if result.failures:
            extra += f", {result.failures} FAILED"
        cache = after.get("cache", {})
        if cache.get("enabled"):
            hits = cache["hits"] - before["cache"]["hits"]
            lookups = hits + cache["misses"] - before["cache"]["misses"]
            extra += f", cache hit rate {hits / max(lookups, 1):.2f}"
        print(row(f"server {label}, {clients:>2} client(s)", result.items_per_s, result.percentile(50),
                  result.percentile(95), extra), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for the 16-client ratio")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    count = 40 if args.quick else args.requests
    requests = make_requests(count, args.docs)
    model = load_model()

    print(f"## Throughput: {count} requests x {args.docs} documents")
    print(HEADER)
    by_batch = {b: in_process_items_per_s(model, requests, b) for b in BATCH_SIZES}
    for b, value in by_batch.items():
        print(row(f"in-process, batch {b}", value, float("nan"), float("nan")))
    best = max(by_batch, key=by_batch.get)
    ceiling = by_batch[best]
    print(f"ceiling: batch {best}, {ceiling:.1f} items/s", flush=True)

    judged = judged_set()
    quality = {}
    if judged is not None:
        quality["in-process"] = quality_in_process(model, judged)

    with running_server() as url:
        drive(url, "/rerank", requests[:16], 4)  # warm up (cost model, allocator)
        server_rows(url, requests, ceiling, "cache off", (1, 4))
        # This machine's speed drifts by several percent from minute to minute (a shared VM):
        # the 16-client comparison alternates in-process and server runs and compares medians.
        pairs = []
        for _ in range(args.rounds):
            inside = in_process_items_per_s(model, requests, best)
            served = drive(url, "/rerank", requests, 16)
            pairs.append((inside, served))
            print(row(f"  round: in-process, batch {best}", inside, float("nan"), float("nan")))
            print(row("  round: server cache off, 16 client(s)", served.items_per_s, served.percentile(50),
                      served.percentile(95), f"{served.items_per_s / inside:.2f}x this round"))  # fmt: skip
        inside_median = float(np.median([p[0] for p in pairs]))
        served_median = float(np.median([p[1].items_per_s for p in pairs]))
        print(f"16 clients, median of {args.rounds} alternating rounds: server {served_median:.1f} items/s, "
              f"in-process {inside_median:.1f} items/s -> {served_median / inside_median:.2f}x")  # fmt: skip
        if judged is not None:
            quality["server, cache off"] = quality_server(url, judged)

    mixed = mixed_length_requests(count, args.docs)
    mixed_runs = {}
    for grouping in ("true", "false"):  # each on a fresh server: same start, same warm-up
        with running_server({"BATCH_LENGTH_GROUPING": grouping}) as url:
            drive(url, "/rerank", mixed[:16], 4)
            mixed_runs[grouping] = drive(url, "/rerank", mixed, 16)
    grouped, ungrouped = mixed_runs["true"], mixed_runs["false"]

    with running_server({"ENABLE_PREDICTION_CACHE": "true"}) as url:
        drive(url, "/rerank", make_requests(16, args.docs, seed=99), 4)  # warm up on other texts
        print()
        print("## Prediction cache: the same requests twice, 16 clients")
        print(HEADER)
        server_rows(url, requests, ceiling, "cache cold", (16,))
        server_rows(url, requests, ceiling, "cache warm", (16,))
        cache = httpx.get(f"{url}/metrics").json()["cache"]
        print(f"cache: {cache}")
        if judged is not None:
            quality_server(url, judged)  # fill the cache
            quality["server, cache on (second pass)"] = quality_server(url, judged)

    print()
    print("## Mixed-length traffic (documents of 5 to 300 words), 16 clients")
    print(HEADER)
    print(row("length grouping on (default)", grouped.items_per_s, grouped.percentile(50),
              grouped.percentile(95)))  # fmt: skip
    print(row("BATCH_LENGTH_GROUPING=false", ungrouped.items_per_s, ungrouped.percentile(50),
              ungrouped.percentile(95)))  # fmt: skip
    print(f"grouping speed-up: {grouped.items_per_s / ungrouped.items_per_s:.2f}x")

    if quality:
        print()
        print(f"## Rerank quality: NDCG@10 over {len(judged.queries)} judged TREC-DL19 queries")
        for label, value in quality.items():
            print(f"{label:<40} {value:.4f}")
        rounded = {f"{v:.4f}" for v in quality.values()}
        print("agree to 4 decimals" if len(rounded) == 1 else f"DISAGREE: {sorted(rounded)}")


if __name__ == "__main__":
    main()
