"""The traffic users bring, server against in-process sentence-transformers, torch on both sides.

    .venv/bin/python -m benchmarks.bench_workloads [--rounds 2] [--job-texts 20000] [--dtype float32|auto]

One process run; the server (``python -m reranker``, BACKEND=torch, default settings but
``DTYPE``) and the in-process model take turns (alternating rounds, never at the same time), on
the same texts, at the same precision: ``--dtype float32`` (the default) runs both in float32;
``--dtype auto`` runs the server at the precision it picks and the in-process model's weights
in that precision too:

- RAG: 1 client, 30 requests of 1 query x 50 passages of 40-120 words: p50 latency;
- 16 clients x 8 passages (160 requests): throughput;
- ingestion: one /embed of 3,000 equal-length chunks, and one of 3,000 mixed-length chunks;
- a 20,000-text embed job through /v1/jobs (submit, poll until COMPLETED).

Prints, per workload, the in-process and server figures, their ratio against its target, and
the model batches the server ran (from /metrics) against items / BATCH_SIZE.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from benchmarks.common import drive, load_passages_and_queries, server_process

BATCH_SIZE = 32


@dataclass
class Outcome:
    value: float  # items/s, or p50 ms for latency workloads
    batches: int = 0
    items: int = 0


def load_model():
    from sentence_transformers import SentenceTransformer

    from reranker.backends.source import embedded_model_path

    return SentenceTransformer(str(embedded_model_path()), device="cpu").eval()


def passages_of_words(passages: list[str], low: int, high: int, count: int, rng: random.Random) -> list[str]:
    words = " ".join(passages).split()
    return [" ".join(rng.choices(words, k=rng.randint(low, high))) for _ in range(count)]


def equal_length_chunks(model, passages: list[str], count: int, tokens: int, rng: random.Random) -> list[str]:
    """Chunks of exactly ``tokens`` word pieces (special tokens included), as an ingestion
    pipeline that cuts documents at a token budget produces."""
    tokenizer = model.tokenizer
    vocabulary = sorted({w for p in passages[:2000] for w in p.lower().split() if w.isalpha()})
    single = [w for w in vocabulary if len(tokenizer.tokenize(w)) == 1]
    chunks = [" ".join(rng.choices(single, k=tokens - 2)) for _ in range(count)]
    lengths = {len(tokenizer(c)["input_ids"]) for c in chunks[:50]}
    assert lengths == {tokens}, lengths
    return chunks


def server_batches(url: str) -> int:
    return httpx.get(f"{url}/metrics", timeout=30).json()["batches_run"]


def in_process_rag(model, requests: list[dict]) -> Outcome:
    latencies = []
    for body in requests:
        started = time.perf_counter()
        model.encode([body["query"], *body["documents"]], batch_size=BATCH_SIZE, normalize_embeddings=True)
        latencies.append((time.perf_counter() - started) * 1000)
    return Outcome(statistics.median(latencies))


def server_rag(url: str, requests: list[dict]) -> Outcome:
    before = server_batches(url)
    result = drive(url, "/rerank", requests, clients=1)
    assert result.failures == 0
    return Outcome(result.percentile(50), server_batches(url) - before, result.items)


def in_process_throughput(model, texts: list[str], items: int) -> Outcome:
    started = time.perf_counter()
    model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True)
    return Outcome(items / (time.perf_counter() - started))


def server_concurrent(url: str, requests: list[dict]) -> Outcome:
    before = server_batches(url)
    result = drive(url, "/rerank", requests, clients=16)
    assert result.failures == 0
    return Outcome(result.items_per_s, server_batches(url) - before, result.items)


def server_embed(url: str, chunks: list[str]) -> Outcome:
    body = {"batch_id": "b", "chunks": [{"chunk_id": str(i), "content": c} for i, c in enumerate(chunks)]}
    before = server_batches(url)
    started = time.perf_counter()
    response = httpx.post(f"{url}/embed", json=body, timeout=600)
    seconds = time.perf_counter() - started
    assert response.status_code == 200, response.text[:300]
    return Outcome(len(chunks) / seconds, server_batches(url) - before, len(chunks))


def server_job(url: str, chunks: list[str]) -> Outcome:
    body = {"batch_id": "job", "chunks": [{"chunk_id": str(i), "content": c} for i, c in enumerate(chunks)]}
    before = server_batches(url)
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as client:
        job = client.post("/v1/jobs", json={"type": "embed", "input": body})
        assert job.status_code == 202, job.text[:300]
        while True:
            view = client.get(job.json()["status_url"]).json()
            if view["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    assert view["status"] == "COMPLETED", view.get("error")
    return Outcome(len(chunks) / seconds, server_batches(url) - before, len(chunks))


def alternate(
    rounds: int, local: Callable[[], Outcome], served: Callable[[], Outcome]
) -> tuple[Outcome, Outcome]:
    """Median over ``rounds`` of each side, the sides taking turns."""
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(local())
        theirs.append(served())
    median_local = statistics.median(o.value for o in mine)
    median_served = statistics.median(o.value for o in theirs)
    last = theirs[-1]
    return Outcome(median_local), Outcome(median_served, last.batches, last.items)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--job-texts", type=int, default=20_000)
    parser.add_argument("--dtype", choices=["float32", "auto"], default="float32")
    parser.add_argument(
        "--only", default="", help="comma-separated workload names that start with these words (e.g. RAG,16)"
    )
    args = parser.parse_args()
    only = [word.strip() for word in args.only.split(",") if word.strip()]

    rng = random.Random(0)
    passages, queries = load_passages_and_queries()
    model = load_model()
    model.encode(["warm up"] * 64, batch_size=BATCH_SIZE)

    rag = [
        {"query": rng.choice(queries), "documents": passages_of_words(passages, 40, 120, 50, rng)}
        for _ in range(30)
    ]
    concurrent = [{"query": rng.choice(queries), "documents": rng.sample(passages, 8)} for _ in range(160)]
    concurrent_texts = [t for r in concurrent for t in (r["query"], *r["documents"])]
    equal = equal_length_chunks(model, passages, 3000, 128, rng)
    mixed = [rng.choice(passages) for _ in range(3000)]
    job = [rng.choice(passages) for _ in range(args.job_texts)]

    rows = []
    with server_process({"BACKEND": "torch", "DTYPE": args.dtype, "LOG_LEVEL": "warning"}) as (url, _):
        served_dtype = httpx.get(f"{url}/health", timeout=10).json()["model"]["dtype"]
        if served_dtype != "float32":
            import torch

            model.to(getattr(torch, served_dtype))
        print(f"server and in-process model in {served_dtype}", flush=True)
        drive(url, "/rerank", rag[:3], clients=1)  # warm the server's batch shapes
        workloads = [
            ("RAG 1 client, 50 passages: p50 ms", 1.10, "latency", lambda: in_process_rag(model, rag),
             lambda: server_rag(url, rag)),
            ("16 clients x 8 passages: items/s", 0.95, "throughput",
             lambda: in_process_throughput(model, concurrent_texts, 160 * 8),
             lambda: server_concurrent(url, concurrent)),
            ("/embed 3,000 equal-length chunks: texts/s", 0.95, "throughput",
             lambda: in_process_throughput(model, equal, len(equal)), lambda: server_embed(url, equal)),
            ("/embed 3,000 mixed chunks: texts/s", 0.95, "throughput",
             lambda: in_process_throughput(model, mixed, len(mixed)), lambda: server_embed(url, mixed)),
        ]  # fmt: skip
        workloads = [w for w in workloads if not only or any(w[0].startswith(word) for word in only)]
        for name, target, kind, local, served in workloads:
            mine, theirs = alternate(args.rounds, local, served)
            rows.append((name, target, kind, mine, theirs))
            print(
                f"done: {name}: in-process {mine.value:.1f}, server {theirs.value:.1f}, "
                f"batches {theirs.batches}",
                flush=True,
            )
        if not only or any("embed job".startswith(word) for word in only):
            mine, theirs = alternate(
                1, lambda: in_process_throughput(model, job, len(job)), lambda: server_job(url, job)
            )
            rows.append((f"embed job of {len(job):,} texts: texts/s", 0.90, "throughput", mine, theirs))

    print()
    heads = ("in-process", "server", "ratio", "target", "batches", "items/32")
    print(f"{'workload':<46} " + " ".join(f"{h:>{max(len(h), 6)}}" for h in heads))
    failed = 0
    for name, target, kind, mine, theirs in rows:
        if kind == "latency":
            ratio = theirs.value / mine.value
            ok = ratio <= target
            goal = f"<={target:.2f}"
        else:
            ratio = theirs.value / mine.value
            ok = ratio >= target
            goal = f">={target:.2f}"
        failed += not ok
        ideal = math.ceil(theirs.items / BATCH_SIZE) if kind == "throughput" and "clients" not in name else ""
        print(
            f"{name:<46} {mine.value:>10.1f} {theirs.value:>6.1f} {ratio:>6.2f} {goal:>6} "
            f"{theirs.batches:>7} {ideal!s:>8}{'' if ok else '  MISSED'}"
        )
    print(f"\n{len(rows) - failed}/{len(rows)} workloads within target")


if __name__ == "__main__":
    main()
