"""The MLX backend against torch, in-process, on the embedded model and tiny models of each family.

    .venv/bin/python -m benchmarks.bench_mlx_families [--rounds 3] [--batch 16]

For each model (the embedded all-MiniLM-L6-v2, and the tiny random-weight models of
tests/families.py: XLM-R and ModernBERT cross-encoders, the Qwen3 sequence-classification
and Qwen3-Reranker-style rerankers, the Qwen3 last-token embedder), both backends get the
same tokenized batches of 16 inputs of mixed length; prints the load time, the median
items/s of ``--rounds`` interleaved rounds, and the largest difference from torch. On Linux
mlx runs on the CPU (mlx[cpu], no BLAS); on Apple Silicon on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from reranker.backends.base import Backend, Encoded, ModelKind
from reranker.backends.factory import create_backend
from reranker.backends.source import embedded_model_path
from reranker.backends.templates import QWEN3_RERANKER
from tests.conftest import make_settings

QUERY = "how many people live in berlin"
SENTENCE = "berlin is the capital of germany and has a large population of people in the city"
WORDS = SENTENCE.split()
FAMILIES = ["xlm-roberta-cross", "modernbert-cross", "qwen3-seq-cls", "qwen3-reranker", "qwen3-last-token"]


def inputs(backend: Backend, batch: int) -> list[Encoded]:
    texts = [" ".join(WORDS[: 3 + (i * 7) % len(WORDS)] * (1 + i % 4)) for i in range(batch)]
    if backend.info().kind is ModelKind.BI_ENCODER:
        return backend.tokenize_texts(texts)
    query = QWEN3_RERANKER.query_part(QUERY) if backend.info().instruction else QUERY
    return backend.tokenize_pairs([(query, text) for text in texts])


def items_per_second(backend: Backend, batch: list[Encoded]) -> float:
    started = time.perf_counter()
    backend.forward(batch)
    return len(batch) / (time.perf_counter() - started)


def compare(name: str, path: Path, rounds: int, batch_size: int) -> None:
    loaded = {}
    for backend_name in ("torch", "mlx"):
        started = time.perf_counter()
        loaded[backend_name] = create_backend(make_settings(local_model_path=str(path), backend=backend_name))
        loaded[backend_name].forward(inputs(loaded[backend_name], 2))  # warm-up
        loaded[backend_name].load_s = time.perf_counter() - started  # type: ignore[attr-defined]
    batch = inputs(loaded["torch"], batch_size)
    rates: dict[str, list[float]] = {"torch": [], "mlx": []}
    for _ in range(rounds):
        for backend_name, backend in loaded.items():
            rates[backend_name].append(items_per_second(backend, batch))
    difference = float(np.abs(loaded["torch"].forward(batch) - loaded["mlx"].forward(batch)).max())
    torch_rate, mlx_rate = (statistics.median(rates[b]) for b in ("torch", "mlx"))
    print(
        f"{name:22s} load torch {loaded['torch'].load_s:5.1f}s mlx {loaded['mlx'].load_s:5.1f}s | "  # type: ignore[attr-defined]
        f"items/s torch {torch_rate:8.1f} mlx {mlx_rate:8.1f} (mlx/torch {mlx_rate / torch_rate:5.2f}x) | "
        f"max |mlx - torch| {difference:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    compare("all-MiniLM-L6-v2", embedded_model_path(), args.rounds, args.batch)
    from tests.families import build_family

    with tempfile.TemporaryDirectory() as root:
        for name in FAMILIES:
            compare(f"tiny {name}", build_family(name, Path(root) / name), args.rounds, args.batch)


if __name__ == "__main__":
    main()
