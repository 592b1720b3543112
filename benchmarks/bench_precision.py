"""float32 against DTYPE=auto, in-process and through the server, in one run of alternating rounds.

    .venv/bin/python -m benchmarks.bench_precision [--rounds 3] [--requests 48] [--no-cross-encoder]

Workloads: all-MiniLM-L6-v2 on ``/v1/embeddings`` and a BERT-base-shaped cross-encoder (random
weights, bge-reranker-base's size; benchmarks.common.bert_base_cross_encoder) on ``/rerank``,
each at 16 clients x 8 passages and 1 client x 8 passages (TREC-DL passages from ../shared).

Setups, each a server subprocess started once (``python -m reranker``) and the same backend
built in this process (``create_backend`` with the same settings; in-process = its forward
passes alone, on the same texts in batches of 32 sorted by length, or one request's 8 items,
on a worker thread as in the server):

- ``float32 torch`` (BACKEND=torch DTYPE=float32 MAX_PARALLEL_REQUESTS=1): the server before
  DTYPE and before two batches at once became the default;
- ``float32 auto`` (DTYPE=float32): float32 at its fastest here (ONNX Runtime where it equals torch);
- ``auto`` (the default): the hardware's native half precision, else float32 (README, "Precision").

Every round measures every setup once, in turn (in-process, then its server), so that the
shared machine's drift falls on all; the table holds each figure's median over the rounds.
The ratios the issue set as targets follow the table. Prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.common import (
    bert_base_cross_encoder,
    configure_threads,
    drive,
    load_average,
    load_passages_and_queries,
    on_model_thread,
    server_process,
)

BATCH = 32  # in-process batches, as BATCH_SIZE's default


@dataclass(frozen=True)
class Setup:
    name: str
    env: dict[str, str]


SETUPS = (
    Setup("float32 torch", {"BACKEND": "torch", "DTYPE": "float32", "MAX_PARALLEL_REQUESTS": "1"}),
    Setup("float32 auto", {"DTYPE": "float32"}),
    Setup("auto", {}),
)


@dataclass(frozen=True)
class Workload:
    name: str
    path: str  # the route
    items_of: str  # the body's list
    env: dict[str, str]  # the model
    cross: bool
    setups: tuple[Setup, ...]


def bodies(workload: Workload, count: int, per: int, seed: int) -> list[dict[str, Any]]:
    passages, queries = load_passages_and_queries()
    rng = np.random.default_rng(seed)
    chosen = [[passages[i] for i in rng.choice(len(passages), per, replace=False)] for _ in range(count)]
    if workload.cross:
        return [{"query": queries[k % len(queries)], "documents": docs} for k, docs in enumerate(chosen)]
    return [{"input": docs} for docs in chosen]


def in_process(backend: Any, workload: Workload, requests: list[dict], together: bool) -> tuple[float, float]:
    """(items/s, p50 ms per request): all requests' items in sorted batches, or each request alone."""

    def items_of(body: dict) -> list:
        if workload.cross:
            return backend.tokenize_pairs([(body["query"], d) for d in body["documents"]])
        return backend.tokenize_texts(body["input"])

    if together:
        items = sorted((i for body in requests for i in items_of(body)), key=len)
        started = time.perf_counter()
        for start in range(0, len(items), BATCH):
            on_model_thread(backend.forward, items[start : start + BATCH])
        seconds = time.perf_counter() - started
        return len(items) / seconds, float("nan")
    latencies, count = [], 0
    for body in requests:
        started = time.perf_counter()
        items = items_of(body)
        on_model_thread(backend.forward, items)
        latencies.append((time.perf_counter() - started) * 1000)
        count += len(items)
    return count / (sum(latencies) / 1000), float(np.median(latencies))


def served(url: str, workload: Workload, requests: list[dict], clients: int) -> tuple[float, float]:
    result = drive(url, workload.path, requests, clients, workload.items_of)
    assert result.failures == 0, f"{result.failures} requests failed"
    return result.items_per_s, result.percentile(50)


def measure(
    workload: Workload, rounds: int, requests: int, onnx_cache: str
) -> tuple[dict[tuple[str, str, str], list[tuple[float, float]]], dict[str, str]]:
    from reranker.backends.factory import create_backend
    from reranker.settings import load_settings

    results: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    chosen: dict[str, str] = {}
    busy = bodies(workload, requests, 8, seed=1)
    single = bodies(workload, max(4, requests // 4), 8, seed=2)
    with ExitStack() as stack:
        servers: dict[str, str] = {}
        backends: dict[str, Any] = {}
        for setup in workload.setups:
            env = {"ONNX_CACHE_DIR": onnx_cache, "LOG_LEVEL": "warning", "REQUEST_TIMEOUT_S": "600"}
            env |= workload.env | setup.env  # a busy shared machine: no request may time out
            backends[setup.name] = create_backend(load_settings(environ=env))
            url, _ = stack.enter_context(server_process(env))
            servers[setup.name] = url
            info = backends[setup.name].info()
            chosen[setup.name] = f"{info.backend} {info.dtype}"
            drive(url, workload.path, single[:2], 1, workload.items_of)  # warm
        for _ in range(rounds):
            for setup in workload.setups:
                backend, url = backends[setup.name], servers[setup.name]
                name = setup.name
                results[(name, "in-process", "16x8")].append(in_process(backend, workload, busy, True))
                results[(name, "in-process", "1x8")].append(in_process(backend, workload, single, False))
                results[(name, "server", "16x8")].append(served(url, workload, busy, 16))
                results[(name, "server", "1x8")].append(served(url, workload, single, 1))
    return results, chosen


def median(values: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


def report(workload: Workload, results: dict, chosen: dict[str, str]) -> Iterator[str]:
    yield f"\n{workload.name}"
    yield "| setup | runs | where | clients x passages | items/s | p50 ms | x float32 torch server |"
    yield "|---|---|---|---|---:|---:|---:|"
    base = {load: median(results[("float32 torch", "server", load)]) for load in ("16x8", "1x8")}
    for setup in workload.setups:
        for where in ("in-process", "server"):
            for load in ("16x8", "1x8"):
                speed, p50 = median(results[(setup.name, where, load)])
                ratio = speed / base[load][0]
                shown = "-" if p50 != p50 else f"{p50:.0f}"
                yield (
                    f"| {setup.name} | {chosen[setup.name]} | {where} | {load} | {speed:.1f} | {shown} "
                    f"| {ratio:.2f}x |"
                )
    auto16 = median(results[("auto", "server", "16x8")])[0]
    auto_in = median(results[("auto", "in-process", "16x8")])[0]
    auto1 = median(results[("auto", "server", "1x8")])[1]
    yield (
        f"default server / float32 torch server, 16x8: {auto16 / base['16x8'][0]:.2f}x (target >= 2.5x); "
        f"default server / in-process at its precision, 16x8: {auto16 / auto_in:.2f}x (target >= 0.95x); "
        f"1 client p50 default / float32 torch: {auto1 / base['1x8'][1]:.2f}x (target <= 0.5x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="requests of 8 per 16-client measurement")
    parser.add_argument("--cross-requests", type=int, default=16, help="the same, for the cross-encoder")
    parser.add_argument("--no-cross-encoder", action="store_true")
    parser.add_argument("--no-embeddings", action="store_true", help="the cross-encoder only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(load_average(), f"(before); {configure_threads()} threads per batch, in-process as in the server")
    onnx_cache = tempfile.mkdtemp(prefix="reranker-bench-onnx-")
    embeddings = Workload("all-MiniLM-L6-v2, /v1/embeddings", "/v1/embeddings", "input", {}, False, SETUPS)
    workloads = [] if args.no_embeddings else [(embeddings, args.requests)]
    if not args.no_cross_encoder:  # float32 auto left out: exporting BERT-base to ONNX takes minutes
        model = {"LOCAL_MODEL_PATH": str(bert_base_cross_encoder())}
        name = "BERT-base-shaped cross-encoder (random weights), /rerank"
        cross = Workload(name, "/rerank", "documents", model, True, (SETUPS[0], SETUPS[2]))
        workloads.append((cross, args.cross_requests))
    for workload, requests in workloads:
        results, chosen = measure(workload, args.rounds, requests, onnx_cache)
        for line in report(workload, results, chosen):
            print(line, flush=True)
    print(load_average(), "(after)")


if __name__ == "__main__":
    main()
