"""Helpers shared by the benchmark scripts: realistic texts, a server subprocess, load clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np

T = TypeVar("T")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl19-subset"


def load_passages_and_queries(seed: int = 0) -> tuple[list[str], list[str]]:
    """MS MARCO passages and queries from ../shared when present, else synthetic text."""
    if (SHARED_DATA / "corpus.jsonl").is_file():
        with open(SHARED_DATA / "corpus.jsonl", encoding="utf-8") as fh:
            passages = [json.loads(line)["text"] for line in fh]
        with open(SHARED_DATA / "queries.jsonl", encoding="utf-8") as fh:
            queries = [json.loads(line)["text"] for line in fh]
        return passages, queries
    rng = random.Random(seed)
    vocabulary = [f"word{i}" for i in range(5000)]
    passages = [" ".join(rng.choices(vocabulary, k=rng.randint(20, 80))) for _ in range(5000)]
    queries = [" ".join(rng.choices(vocabulary, k=rng.randint(3, 8))) for _ in range(50)]
    return passages, queries


def make_requests(count: int, docs_per_request: int, seed: int = 0) -> list[dict]:
    passages, queries = load_passages_and_queries(seed)
    rng = random.Random(seed)
    return [
        {"query": rng.choice(queries), "documents": rng.sample(passages, docs_per_request)}
        for _ in range(count)
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m reranker`` in a subprocess on a free port; yields its base URL."""
    with server_process(env) as (url, _):
        yield url


@contextmanager
def server_process(env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """``python -m reranker`` in a subprocess on a free port; yields its base URL and PID."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "reranker", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become healthy")
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@dataclass
class LoadResult:
    requests: int
    items: int
    seconds: float
    latencies_ms: list[float]
    failures: int

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def _drive(url: str, path: str, bodies: list[dict], clients: int, items_of: str) -> LoadResult:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    failures = 0
    items = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal failures, items
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(path, json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code == 200:
                    items += len(body[items_of])
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - started
    return LoadResult(len(bodies), items, seconds, latencies, failures)


def drive(url: str, path: str, bodies: list[dict], clients: int, items_of: str = "documents") -> LoadResult:
    return asyncio.run(_drive(url, path, bodies, clients, items_of))


def row(label: str, items_per_s: float, p50: float, p95: float, extra: str = "") -> str:
    return f"{label:<44} {items_per_s:>10.1f} {p50:>10.1f} {p95:>10.1f}  {extra}"


HEADER = f"{'setup':<44} {'items/s':>10} {'p50 ms':>10} {'p95 ms':>10}"


BERT_BASE_CROSS_ENCODER = Path("/tmp/reranker-bench-bert-base-cross-encoder")


def bert_base_cross_encoder(target: Path = BERT_BASE_CROSS_ENCODER) -> Path:
    """A cross-encoder of BERT-base's shape (bge-reranker-base's size: 12 layers, hidden 768),
    random weights with a fixed seed, the embedded model's WordPiece tokenizer: for timing only.
    Built once (about 440 MB) and reused."""
    if (target / "config.json").is_file():
        return target
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from reranker.backends.source import embedded_model_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    config = BertConfig(vocab_size=len(tokenizer), num_labels=1)  # BERT-base's defaults otherwise
    hf_dir = target.parent / f"{target.name}-hf"
    BertForSequenceClassification(config).eval().save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    CrossEncoder(str(hf_dir), num_labels=1, device="cpu").save(str(target))
    return target


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def configure_threads() -> int:
    """Size torch's (and ONNX Runtime's) thread pools as the server does (reranker.backends.threads).
    In-process figures also run their batches on a worker thread (``on_model_thread``), as the
    server does."""
    from reranker.backends import threads
    from reranker.engine import resources

    found = resources.detect(1, 0)
    threads.configure(found.threads_per_batch, found.cpus)
    return found.threads_per_batch


_MODEL_THREAD = ThreadPoolExecutor(1, thread_name_prefix="model")


def on_model_thread(call: Callable[..., T], *args: object) -> T:
    """``call(*args)`` on one worker thread, as the server runs its batches (asyncio.to_thread).
    On this busy 2-core machine torch ran the same 8-text batch in 1 s on the main thread and
    0.08 s on a worker thread, so in-process figures taken on the main thread were meaningless."""
    return _MODEL_THREAD.submit(call, *args).result()
