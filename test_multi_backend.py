#!/usr/bin/env python3
"""test_multi_backend.py: the model on every available backend, against torch and on TREC-DL 2019.

    .venv/bin/python test_multi_backend.py [--model NAME_OR_PATH] [--data DIR] [--batch-size 32]
    .venv/bin/python test_multi_backend.py --families

``--families`` builds the tiny random-weight model of every family of tests/families.py (BERT,
DistilBERT, RoBERTa, XLM-R, ModernBERT, Qwen3, a Qwen3-Reranker-style causal LM) and prints the
family x backend matrix: each cell is "exact" (within 1e-4 of in-process sentence-transformers, or
of the Qwen3-Reranker formula), "WRONG" with the largest difference, or the start-up refusal.
Exits 1 on a WRONG cell.

Prints the CPU (instruction-set flags, and the int8 settings they call for), then for each
backend (torch fp32, torch bf16, torch fp16, ONNX fp32, ONNX int8, MLX fp32): device, load time, items/s (real
passages sorted by length in batches, as the server's batcher groups them, interleaved
between backends in chunks so that the machine's drift is shared), the largest
difference from torch in a score or a normalised vector component and the ranking
agreement (Spearman) on one query against 30 documents, the worst vector cosine, and
NDCG@10 on the TREC-DL 2019 subset (``../shared/data/trec-dl19-subset``, BEIR format):

- full: the 43 judged queries against the whole corpus (5,000 passages), ranked by
  cosine (a bi-encoder) or, for a cross-encoder, each query's judged passages reranked;
- small: the ``--small-queries`` queries with the fewest judged passages, against the
  union of those passages. A backend too slow for the full set within ``--full-budget-s``
  (MLX on Linux CPU, which has no BLAS) gets the small one only; every backend gets it,
  so the small column compares them all.

Exits 1 when an exact backend (torch, ONNX fp32, MLX) differs from torch by more than
1e-5: that holds on every CPU. int8's figures differ by instruction set (AVX2, AVX-512
VNNI, ARM), so they are reported, not judged; the server itself refuses int8 below
ONNX_INT8_MIN_AGREEMENT at start-up (shown here as "refused"). Half precision (DTYPE=bfloat16,
float16) is reported the same way: fast where the CPU has AMX (bfloat16) or AMX-FP16, slow
elsewhere (torch emulates it), and held by the server to HALF_PRECISION_MIN_AGREEMENT. Backends whose package
is missing are listed as skipped. A script, not part of the pytest suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import on_model_thread
from tests.backend_texts import QUERY, TEXTS

EXACT = 1e-5  # torch, ONNX fp32 and MLX against torch: a score or a normalised vector component
FLAGS_SHOWN = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
FLAGS_SHOWN += ("asimd", "asimddp", "i8mm")  # ARM: NEON, dot product, int8 matrix multiply
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "data" / "trec-dl19-subset"


@dataclass
class Trec:
    queries: dict[str, str]  # judged queries only
    passages: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def small(self, count: int) -> Trec:
        """The ``count`` queries with the fewest judged passages, against the union of those."""
        chosen = sorted(self.queries, key=lambda q: (len(self.qrels[q]), q))[:count]
        pool = sorted({p for q in chosen for p in self.qrels[q]})
        return Trec({q: self.queries[q] for q in chosen}, {p: self.passages[p] for p in pool}, self.qrels)


def lines(path: Path) -> list[str]:
    """Non-empty lines (``splitlines`` would also split at the Unicode separators inside JSON strings)."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def load_trec(root: Path) -> Trec:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for line in lines(root / "qrels" / "test.tsv"):
        query, passage, grade = line.split("\t")[:3]
        qrels[query][passage] = int(grade)
    queries = {row["_id"]: row["text"] for row in map(json.loads, lines(root / "queries.jsonl"))}
    passages = {}
    for row in map(json.loads, lines(root / "corpus.jsonl")):
        passages[row["_id"]] = f"{row.get('title') or ''} {row['text']}".strip()
    return Trec({q: text for q, text in queries.items() if q in qrels}, passages, dict(qrels))


def ndcg_at_10(ranked: Sequence[str], judged: dict[str, int]) -> float:
    """trec_eval's ndcg_cut_10: linear gains, log2 discount, ideal order of every judged passage."""
    discounts = 1.0 / np.log2(np.arange(2, 12))
    gains = np.array([judged.get(p, 0) for p in ranked[:10]], dtype=np.float64)
    ideal = np.sort(np.array(list(judged.values()), dtype=np.float64))[::-1][:10]
    best = float(ideal @ discounts[: len(ideal)])
    return float(gains @ discounts[: len(gains)]) / best if best > 0 else 0.0


@dataclass
class Row:
    name: str
    backend: Any = None
    device: str = "-"
    load_s: float = float("nan")
    max_diff: float = float("nan")
    spearman: float = float("nan")
    cosine: float = float("nan")
    ndcg: dict[str, float] = field(default_factory=dict)  # "full" / "small"
    speed: dict[str, tuple[int, float]] = field(default_factory=dict)  # items, seconds per sample
    verdict: str = ""


class Timed:
    """A backend's model calls on sorted batches, adding up items and seconds."""

    def __init__(self, row: Row, batch_size: int) -> None:
        self.row, self.batch_size = row, batch_size

    def run(self, items: list, sample: str) -> np.ndarray:
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        out: list[np.ndarray] = [np.empty(0)] * len(items)
        started = time.perf_counter()
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            values = on_model_thread(self.row.backend.forward, [items[i] for i in chosen])
            for i, value in zip(chosen, values, strict=True):
                out[i] = value
        count, seconds = self.row.speed.get(sample, (0, 0.0))
        self.row.speed[sample] = (count + len(items), seconds + time.perf_counter() - started)
        return np.stack(out)


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def comparable(backend: Any, kind: str) -> np.ndarray:
    """Scores of TEXTS for QUERY (sigmoid, or cosine), then the normalised vectors if any."""
    if kind == "cross-encoder":
        logits = backend.forward(backend.tokenize_pairs([(QUERY, d) for d in TEXTS]))
        return 1.0 / (1.0 + np.exp(-logits))
    vectors = unit(backend.forward(backend.tokenize_texts([QUERY, *TEXTS])))
    return np.concatenate([vectors[1:] @ vectors[0], vectors.reshape(-1)])


def compare(row: Row, reference: np.ndarray, values: np.ndarray, kind: str) -> None:
    count = len(TEXTS)
    row.max_diff = float(np.abs(values - reference).max())
    row.spearman = float(np.corrcoef(ranks(values[:count]), ranks(reference[:count]))[0, 1])
    if kind != "cross-encoder":
        got, want = values[count:].reshape(count + 1, -1), reference[count:].reshape(count + 1, -1)
        row.cosine = float((got * want).sum(1).min())


class Evaluation:
    """NDCG@10 of one backend on one set, run chunk by chunk so that backends can take turns."""

    def __init__(self, trec: Trec, timed: Timed, kind: str, sample: str, chunk: int = 256) -> None:
        self.trec, self.timed, self.kind, self.sample, self.chunk = trec, timed, kind, sample, chunk
        self.cross = kind == "cross-encoder"
        if self.cross:  # each judged query's judged passages, reranked
            self.work: list = [(q, p) for q in trec.queries for p in trec.qrels[q] if p in trec.passages]
        else:  # every query against every passage
            self.work = list(trec.passages)
        self.outputs: list[np.ndarray] = []
        self.done = 0

    @property
    def steps(self) -> int:
        return -(-len(self.work) // self.chunk)

    def step(self) -> None:
        backend: Any = self.timed.row.backend
        part = self.work[self.done : self.done + self.chunk]
        if self.cross:
            items = backend.tokenize_pairs([(self.trec.queries[q], self.trec.passages[p]) for q, p in part])
            self.outputs.append(self.timed.run(items, self.sample))
        else:
            items = backend.tokenize_texts([self.trec.passages[p] for p in part])
            self.outputs.append(unit(self.timed.run(items, self.sample)))
        self.done += len(part)
        if self.done == len(self.work):
            self.timed.row.ndcg[self.sample] = float(np.mean(self._per_query(np.concatenate(self.outputs))))

    def _per_query(self, outputs: np.ndarray) -> list[float]:
        qrels = self.trec.qrels
        if self.cross:
            scored: dict[str, list[tuple[float, str]]] = defaultdict(list)
            for (q, p), logit in zip(self.work, outputs, strict=True):
                scored[q].append((-float(logit), p))
            return [ndcg_at_10([p for _, p in sorted(pairs)], qrels[q]) for q, pairs in scored.items()]
        backend: Any = self.timed.row.backend
        queries = list(self.trec.queries)
        vectors = unit(backend.forward(backend.tokenize_texts([self.trec.queries[q] for q in queries])))
        similarities = vectors @ outputs.T
        return [
            ndcg_at_10([self.work[i] for i in np.argsort(-row, kind="stable")[:10]], qrels[q])
            for q, row in zip(queries, similarities, strict=True)
        ]


def cpu_line() -> str:
    from reranker.backends.onnx_quantize import int8_profile
    from reranker.backends.selection import CPUINFO, read_cpu_flags

    flags = read_cpu_flags(CPUINFO)
    model = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
        platform.processor() or "?",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shown = " ".join(f for f in FLAGS_SHOWN if f in flags) or "unknown"
    absent = " ".join(f for f in FLAGS_SHOWN if f not in flags and flags)
    return (
        f"CPU: {model}, {platform.machine()}, {cores} cores; flags: {shown}"
        + (f" (not: {absent})" if absent else "")
        + f"\nint8 settings for this CPU: {int8_profile(platform.machine(), flags).why}"
    )


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


DOCS_TABLE = Path(__file__).resolve().parent / "docs" / "MODELS.md"


def family_matrix(write_docs: bool) -> int:
    """Every row of tests/families.py's table on torch, ONNX fp32 and MLX, against its library:
    prints the markdown table (``write_docs``: into docs/MODELS.md too); 1 if any cell is not what
    the table promises (exact, or refused at start-up)."""
    from reranker.backends.factory import create_backend
    from reranker.errors import StartupError
    from reranker.settings import load_settings
    from tests.families import (
        BACKENDS,
        TABLE,
        TABLE_END,
        TABLE_START,
        build_family,
        expected,
        family_table,
        reference_output,
        served_output,
        tolerance,
    )

    root = Path(tempfile.mkdtemp(prefix="reranker-families-"))
    cache = str(root / "onnx-cache")
    wrong = 0
    cells: dict[str, dict[str, str]] = {}
    for family in TABLE:
        path = build_family(family, root / family)
        want = reference_output(path, family)
        cells[family] = {}
        for backend_name in BACKENDS:
            environ = {
                "LOCAL_MODEL_PATH": str(path),
                "ONNX_CACHE_DIR": cache,
                "DEVICE_PREFERENCE": "cpu",
                "BACKEND": backend_name,
                "DTYPE": "float32",
            }
            try:
                backend = create_backend(load_settings(environ=environ))
            except StartupError as exc:
                promised = expected(family, backend_name) == "refused"
                wrong += not promised
                cells[family][backend_name] = "refused" if promised else f"**REFUSED**: {exc.message}"
                continue
            gap = float(np.abs(np.asarray(served_output(backend, family)) - want).max())
            bound = tolerance(family, want)
            ok = gap <= bound and expected(family, backend_name) == "exact"
            wrong += not ok
            cells[family][backend_name] = f"exact ({gap:.0e})" if ok else f"**WRONG** ({gap:.3g})"
        print(family, cells[family], flush=True)
    table = family_table(cells)
    print(table)
    if write_docs and not wrong:
        text = DOCS_TABLE.read_text()
        start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
        DOCS_TABLE.write_text(text[:start] + "\n" + table + "\n" + text[end:])
        print(f"written to {DOCS_TABLE}")
    return 1 if wrong else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="MODEL_NAME or a local path (default: the embedded model)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TREC-DL 2019 subset (BEIR format)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--small-queries", type=int, default=6)
    parser.add_argument(
        "--full-budget-s", type=float, default=600.0, help="longest full run a backend may take"
    )
    parser.add_argument("--families", action="store_true", help="the model-family x backend matrix")
    parser.add_argument(
        "--write-docs", action="store_true", help="with --families: the table into docs/MODELS.md"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.families:
        return family_matrix(args.write_docs)

    from benchmarks.common import configure_threads
    from reranker.backends.factory import create_backend, preflight
    from reranker.backends.selection import choose, probe_machine
    from reranker.errors import StartupError
    from reranker.settings import load_settings

    configure_threads()  # as the server does: torch's default pool stalled on a busy machine
    base = {"ONNX_CACHE_DIR": tempfile.mkdtemp(prefix="reranker-onnx-"), "DEVICE_PREFERENCE": "cpu"}
    if args.model:
        base["LOCAL_MODEL_PATH" if os.path.isdir(args.model) else "MODEL_NAME"] = args.model
    kind = preflight(load_settings(environ=base)).kind.value
    plans = {
        "torch fp32": {"BACKEND": "torch", "DTYPE": "float32"},
        "torch bf16": {"BACKEND": "torch", "DTYPE": "bfloat16"},
        "torch fp16": {"BACKEND": "torch", "DTYPE": "float16"},
        "onnx fp32": {"BACKEND": "onnx", "ONNX_QUANTIZE": "none"},
        "onnx int8": {"BACKEND": "onnx", "ONNX_QUANTIZE": "int8"},
        "mlx fp32": {"BACKEND": "mlx", "DTYPE": "float32"},
    }
    rows: list[Row] = []
    reference: np.ndarray | None = None
    for name, env in plans.items():
        row = Row(name)
        rows.append(row)
        started = time.perf_counter()
        try:
            row.backend = create_backend(load_settings(environ={**base, **env}))
        except StartupError as exc:
            judged = "int8" in name or "16" in name  # refused below its floor
            row.verdict = f"refused: {exc.message}" if judged else f"skipped: {exc.message}"
            continue
        row.load_s, row.device = time.perf_counter() - started, row.backend.info().device
        values = comparable(row.backend, kind)
        if reference is None:
            reference = values
        compare(row, reference, values, kind)
        exact = "int8" not in name and "16" not in name
        approximate = f"{name.split()[1]}: not exact"
        row.verdict = ("exact" if row.max_diff <= EXACT else "DISAGREES") if exact else approximate
        print(f"loaded {name} in {row.load_s:.1f} s", file=sys.stderr, flush=True)

    trec = load_trec(args.data)
    loaded = [row for row in rows if row.backend is not None]
    timers = {row.name: Timed(row, args.batch_size) for row in loaded}
    small = trec.small(args.small_queries)
    for row in loaded:  # the small set first: it is also the speed estimate for the full one
        evaluation = Evaluation(small, timers[row.name], kind, "small")
        for _ in range(evaluation.steps):
            evaluation.step()
    full = []
    for row in loaded:
        evaluation = Evaluation(trec, timers[row.name], kind, "full")
        items, seconds = row.speed["small"]
        estimate = len(evaluation.work) * seconds / items
        if estimate <= args.full_budget_s:
            full.append(evaluation)
        else:
            print(f"{row.name}: full set skipped (about {estimate:.0f} s)", file=sys.stderr)
    for _ in range(max((e.steps for e in full), default=0)):
        for evaluation in full:  # backends take turns, chunk by chunk: the machine's drift is shared
            if evaluation.done < len(evaluation.work):
                evaluation.step()
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    print(cpu_line())
    print(
        f"model kind {kind}; batch {args.batch_size}; full: {len(trec.queries)} queries x "
        f"{len(trec.passages)} passages; small: {len(small.queries)} queries x {len(small.passages)} passages"
    )
    print(report(rows))
    auto = choose(load_settings(environ={**base, "DEVICE_PREFERENCE": "auto"}), probe_machine())
    print(f"BACKEND=auto DTYPE=auto here: {auto.backend} on {auto.device} in {auto.dtype} ({auto.reason})")
    return 1 if any(row.verdict == "DISAGREES" for row in rows) else 0


def report(rows: list[Row]) -> str:
    """The table: items/s on the full set (``*``: on the small set only), x torch on the same set."""
    torch = rows[0]

    def speed(row: Row) -> tuple[str, str]:
        sample = "full" if "full" in row.speed else "small"
        if sample not in row.speed:
            return "-", "-"
        items, seconds = row.speed[sample]
        base_items, base_seconds = torch.speed.get(sample, (0, 0.0))
        ratio = (items / seconds) / (base_items / base_seconds) if base_seconds else float("nan")
        return f"{items / seconds:.1f}" + ("*" if sample == "small" else ""), f"{ratio:.2f}x"

    lines = [
        f"{'backend':<11} {'device':<6} {'load s':>6} {'items/s':>8} {'x torch':>7} {'max diff':>9} "
        f"{'spearman':>8} {'min cos':>8} {'ndcg full':>9} {'vs torch':>8} {'ndcg small':>10}  verdict"
    ]
    for row in rows:
        items_per_s, ratio = speed(row)
        full, small = row.ndcg.get("full", NAN), row.ndcg.get("small", NAN)
        delta = full - torch.ndcg.get("full", NAN)
        lines.append(
            f"{row.name:<11} {row.device:<6} {shown(row.load_s, '6.1f')} {items_per_s:>8} {ratio:>7} "
            f"{shown(row.max_diff, '9.1e')} {shown(row.spearman, '8.4f')} {shown(row.cosine, '8.5f')} "
            f"{shown(full, '9.4f')} {shown(delta, '+8.4f')} {shown(small, '10.4f')}  {row.verdict}"
        )
    return "\n".join(lines)


NAN = float("nan")


def shown(value: float, spec: str) -> str:
    """``value`` formatted, or "-" right-aligned in the same width when there is none."""
    width = int(spec.lstrip("+").split(".")[0])
    return format(value, spec) if value == value else "-".rjust(width)


if __name__ == "__main__":
    sys.exit(main())
