#!/usr/bin/env python3
"""test_multi_backend.py: load the model on every available backend and compare them with torch.

    .venv/bin/python test_multi_backend.py [--model NAME_OR_PATH] [--texts 256] [--batch-size 32]

For each backend (torch fp32, onnx fp32, onnx int8, mlx fp32)
prints: device, load time, items/s at the batch size (texts of a bi-encoder, pairs of a
cross-encoder, sorted by length as the server's batcher groups them), the largest
difference from torch (vectors or logits), and the ranking agreement (Spearman of the
scores of one query against 30 documents; for int8 also the worst cosine to torch), and
what BACKEND=auto picks on this machine. Exits 1 when a backend disagrees: fp32 beyond
1e-4, int8 under cosine 0.99 for any vector or Spearman 0.95. Backends whose package
is missing are listed as skipped. A script, not part of the pytest suite
(tests/test_backend_parity.py and tests/test_onnx_backend.py hold the parity tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SENTENCES = [
    "Most broken bones heal in six to eight weeks.",
    "Paris is the capital of France.",
    "A fracture in a child heals faster than in an adult.",
    "Bananas are rich in potassium.",
    "Physiotherapy helps the muscles around a healed bone recover.",
    "The stock market closed higher on Friday.",
    "Calcium and vitamin D support bone repair.",
    "A hip fracture in an elderly patient may need surgery and months of rehabilitation.",
    "Python is a popular programming language for data science.",
    "Smoking slows the healing of fractures.",
]


@dataclass
class Row:
    backend: str
    device: str = "-"
    load_s: float = float("nan")
    items_per_s: float = float("nan")
    max_diff: float = float("nan")
    spearman: float = float("nan")
    cosine: float = float("nan")
    verdict: str = ""


def corpus(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = " ".join(SENTENCES).split()
    return [" ".join(rng.choice(words, size=int(rng.integers(8, 120)))) for _ in range(count)]


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def load(make: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    backend = make()
    return backend, time.perf_counter() - started


def batches_of(backend: object, texts: list[str], batch_size: int, kind: str) -> list[list[object]]:
    if kind == "cross-encoder":
        items = backend.tokenize_pairs([(SENTENCES[0], t) for t in texts])  # type: ignore[attr-defined]
    else:
        items = backend.tokenize_texts(texts)  # type: ignore[attr-defined]
    items = sorted(items, key=len)
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def one_pass(backend: object, batches: list[list[object]]) -> float:
    """Items per second over every batch once (after one warm-up batch)."""
    backend.forward(batches[0])  # type: ignore[attr-defined]
    started = time.perf_counter()
    for batch in batches:
        backend.forward(batch)  # type: ignore[attr-defined]
    return sum(len(batch) for batch in batches) / (time.perf_counter() - started)


def speeds(loaded: dict[str, tuple[object, list[list[object]]]], rounds: int) -> dict[str, float]:
    """Median items/s of each backend over ``rounds`` interleaved passes (the machine's speed
    drifts; interleaving spreads the drift over all). A pass slower than 30 s is not repeated."""
    passes: dict[str, list[float]] = {name: [] for name in loaded}
    for _ in range(rounds):
        for name, (backend, batches) in loaded.items():
            if passes[name] and sum(len(b) for b in batches) / passes[name][0] > 30:
                continue
            passes[name].append(one_pass(backend, batches))
    return {name: float(np.median(values)) for name, values in passes.items()}


def outputs(backend: object, kind: str, documents: list[str]) -> np.ndarray:
    if kind == "cross-encoder":
        return backend.forward(backend.tokenize_pairs([(SENTENCES[0], d) for d in documents]))  # type: ignore[attr-defined]
    return backend.forward(backend.tokenize_texts([SENTENCES[0], *documents]))  # type: ignore[attr-defined]


def scores(values: np.ndarray, kind: str) -> np.ndarray:
    if kind == "cross-encoder":
        return values
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    return unit[1:] @ unit[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="MODEL_NAME or a local path (default: the embedded model)"
    )
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing passes (median)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from reranker.backends.factory import create_backend, preflight
    from reranker.backends.selection import choose, probe_machine
    from reranker.settings import load_settings

    cache = tempfile.mkdtemp(prefix="reranker-onnx-")
    base = {"ONNX_CACHE_DIR": cache, "DEVICE_PREFERENCE": "cpu"}
    if args.model:
        base["LOCAL_MODEL_PATH" if os.path.isdir(args.model) else "MODEL_NAME"] = args.model
    kind = preflight(load_settings(environ=base)).kind.value
    texts = corpus(args.texts)
    documents = corpus(30 + args.texts)[-30:]
    plans = {
        "torch fp32": {"BACKEND": "torch"},
        "onnx fp32": {"BACKEND": "onnx", "ONNX_QUANTIZE": "none"},
        "onnx int8": {"BACKEND": "onnx", "ONNX_QUANTIZE": "int8"},
        "mlx fp32": {"BACKEND": "mlx"},
    }
    rows: list[Row] = []
    loaded: dict[str, tuple[object, list[list[object]]]] = {}
    reference: np.ndarray | None = None
    for name, env in plans.items():
        settings = load_settings(environ={**base, **env})
        try:
            backend, load_s = load(lambda s=settings: create_backend(s))
        except Exception as exc:  # noqa: BLE001 - a missing optional runtime is reported, not fatal
            rows.append(Row(name, verdict=f"skipped: {exc}"))
            continue
        loaded[name] = (backend, batches_of(backend, texts, args.batch_size, kind))
        values = outputs(backend, kind, documents)
        row = Row(name, backend.info().device, load_s)  # type: ignore[attr-defined]
        if reference is None:
            reference, row.verdict = values, "reference"
        else:
            row.max_diff = float(np.abs(values - reference).max())
            row.spearman = float(
                np.corrcoef(ranks(scores(values, kind)), ranks(scores(reference, kind)))[0, 1]
            )
            if kind != "cross-encoder":
                cos = (
                    (values * reference).sum(1)
                    / np.linalg.norm(values, axis=1)
                    / np.linalg.norm(reference, axis=1)
                )
                row.cosine = float(cos.min())
            if "int8" in name:
                ok = (np.isnan(row.cosine) or row.cosine >= 0.99) and row.spearman >= 0.95
            else:
                ok = row.max_diff <= 1e-4
            row.verdict = "agrees" if ok else "DISAGREES"
        rows.append(row)
    measured = speeds(loaded, args.rounds)
    for row in rows:
        row.items_per_s = measured.get(row.backend, float("nan"))

    torch_speed = rows[0].items_per_s
    print(
        f"model kind {kind}; {args.texts} texts, batch {args.batch_size}, CPU, median of {args.rounds} rounds"
    )
    print(f"{'backend':<12} {'device':<7} {'load s':>7} {'items/s':>9} {'vs torch':>9} {'max diff':>10} "
          f"{'spearman':>9} {'min cos':>7}  verdict")  # fmt: skip
    for row in rows:
        ratio = row.items_per_s / torch_speed if torch_speed == torch_speed else float("nan")
        print(f"{row.backend:<12} {row.device:<7} {row.load_s:>7.1f} {row.items_per_s:>9.1f} {ratio:>8.2f}x "
              f"{row.max_diff:>10.2e} {row.spearman:>9.4f} {row.cosine:>7.4f}  {row.verdict}")  # fmt: skip
    auto = choose(load_settings(environ={**base, "DEVICE_PREFERENCE": "auto"}), probe_machine())
    print(f"BACKEND=auto here: {auto.backend} on {auto.device} ({auto.reason})")
    return 1 if any(row.verdict == "DISAGREES" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
