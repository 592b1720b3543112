"""Retrieval cost of each embedding type (/v2/embed's embedding_types) on TREC-DL19.

    .venv/bin/python -m benchmarks.bench_embedding_types [--rescore 100] [--cache /tmp/dl19-minilm.npz]

The embedded all-MiniLM-L6-v2 (sentence-transformers, in this process, normalised) embeds the
5,000 passages of ../shared/data/trec-dl19-subset and its 50 queries once; each query of the 43
judged ranks the whole corpus, and NDCG@10 (the ideal from every judged passage; gains
2^grade - 1 as in the data's README, and linear as trec_eval's) is averaged over them. Codes
are reranker.engine.quantize's, as the server makes them: int8/uint8 with ranges from its
built-in probe texts (the default), and also from the corpus itself (what
EMBEDDING_CALIBRATION_FILE with representative texts gives).

- float: cosine;
- int8 / uint8: dot product of the query's codes with the passages' codes;
- binary / ubinary: hamming distance between packed bits (the two are the same bits, offset),
  alone, and "+ rescore": the ``--rescore`` nearest by hamming reordered by the float query's
  dot product with the passages' float vectors (kept on disk: binary + float rescoring), or
  with the passages' bits as +-1 (nothing but bits kept).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import SHARED_DATA
from reranker.engine.quantize import PROBE_TEXTS, bytes_per_vector, quantize, ranges_of

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def load() -> tuple[list[str], list[str], list[str], list[str], dict[str, dict[str, int]]]:
    with open(SHARED_DATA / "corpus.jsonl", encoding="utf-8") as fh:
        corpus = [json.loads(line) for line in fh]
    with open(SHARED_DATA / "queries.jsonl", encoding="utf-8") as fh:
        queries = [json.loads(line) for line in fh]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(SHARED_DATA / "qrels" / "test.tsv", encoding="utf-8") as fh:
        for line in fh:
            query_id, doc_id, grade = line.split("\t")
            qrels[query_id][doc_id] = int(grade)
    judged = [q for q in queries if q["_id"] in qrels]
    passages = [d["text"] for d in corpus]  # MS MARCO passages have no titles
    return (
        [d["_id"] for d in corpus],
        passages,
        [q["_id"] for q in judged],
        [q["text"] for q in judged],
        qrels,
    )


def ndcg_at_10(ranked: np.ndarray, doc_ids: list[str], grades: dict[str, int], exponential: bool) -> float:
    """NDCG@10, the ideal from every judged passage; gains 2^grade - 1, or the grade (linear)."""

    def gain(grade: np.ndarray) -> np.ndarray:
        return 2.0**grade - 1 if exponential else grade

    gains = gain(np.array([grades.get(doc_ids[i], 0) for i in ranked[:10]], dtype=np.float64))
    discounts = 1.0 / np.log2(np.arange(2, 12))
    ideal = gain(np.sort(np.array(list(grades.values()), dtype=np.float64))[::-1][:10])
    idcg = float((ideal * discounts[: len(ideal)]).sum())
    return float((gains * discounts[: len(gains)]).sum()) / idcg if idcg > 0 else 0.0


def top(scores: np.ndarray, k: int = 10) -> np.ndarray:
    """The ``k`` best positions, best first (ties: lower position first)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def hamming(query_bits: np.ndarray, doc_bits: np.ndarray) -> np.ndarray:
    return _POPCOUNT[np.bitwise_xor(doc_bits, query_bits)].sum(axis=1)


def _bytes(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.int16) + 128).astype(np.uint8) if codes.dtype == np.int8 else codes


def embed_all(passages: list[str], queries: list[str], cache: Path | None) -> tuple[np.ndarray, ...]:
    if cache is not None and cache.is_file():
        data = np.load(cache)
        return data["docs"], data["queries"], data["probe"]
    from sentence_transformers import SentenceTransformer

    from reranker.backends.source import embedded_model_path

    model = SentenceTransformer(str(embedded_model_path()), device="cpu")
    started = time.perf_counter()
    docs = model.encode(passages, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    print(f"embedded {len(passages)} passages in {time.perf_counter() - started:.0f} s")
    qs = model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
    probe = model.encode(list(PROBE_TEXTS), normalize_embeddings=True, convert_to_numpy=True)
    if cache is not None:
        np.savez(cache, docs=docs, queries=qs, probe=probe)
    return docs, qs, probe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rescore", type=int, default=100, help="hamming candidates rescored")
    parser.add_argument("--cache", type=Path, default=None, help="npz to keep the embeddings in")
    args = parser.parse_args()
    started = time.perf_counter()
    doc_ids, passages, query_ids, queries, qrels = load()
    docs, qs, probe = embed_all(passages, queries, args.cache)
    dim = docs.shape[1]
    probe_ranges, corpus_ranges = ranges_of(probe), ranges_of(docs)

    def mean_ndcg(rank) -> tuple[float, float]:
        ranked = [rank(i) for i in range(len(query_ids))]
        return tuple(  # type: ignore[return-value]
            float(
                np.mean(
                    [
                        ndcg_at_10(r, doc_ids, qrels[qid], exp)
                        for r, qid in zip(ranked, query_ids, strict=True)
                    ]
                )
            )
            for exp in (True, False)
        )

    rows: list[tuple[str, int, tuple[float, float]]] = []
    rows.append(("float (cosine)", bytes_per_vector("float", dim), mean_ndcg(lambda i: top(docs @ qs[i]))))
    for kind in ("int8", "uint8"):
        for label, ranges in (("probe ranges", probe_ranges), ("corpus ranges", corpus_ranges)):
            doc_codes = quantize(docs, kind, ranges).astype(np.int32)
            query_codes = quantize(qs, kind, ranges).astype(np.int32)
            ndcg = mean_ndcg(lambda i, d=doc_codes, q=query_codes: top((d @ q[i]).astype(np.float64)))
            rows.append((f"{kind} (dot on codes, {label})", bytes_per_vector(kind, dim), ndcg))
    for kind in ("binary", "ubinary"):
        # binary is ubinary - 128: back to the bytes (a view would flip each byte's top bit)
        doc_bits, query_bits = (_bytes(quantize(vectors, kind)) for vectors in (docs, qs))
        signs = np.unpackbits(doc_bits, axis=-1)[:, :dim].astype(np.float32) * 2 - 1

        def by_hamming(i: int, k: int, d=doc_bits, q=query_bits) -> np.ndarray:
            return top(-hamming(q[i], d).astype(np.float64), k)

        def rescored(i: int, against: np.ndarray, k: int = args.rescore) -> np.ndarray:
            candidates = by_hamming(i, k)
            return candidates[top(against[candidates] @ qs[i])]

        bytes_ = bytes_per_vector(kind, dim)
        rows.append((f"{kind} (hamming)", bytes_, mean_ndcg(lambda i: by_hamming(i, 10))))
        rows.append(
            (f"{kind} + float rescore of top {args.rescore}", bytes_, mean_ndcg(lambda i: rescored(i, docs)))
        )
        rows.append(
            (
                f"{kind} + rescore, float query x +-1 bits (top {args.rescore})",
                bytes_,
                mean_ndcg(lambda i, s=signs: rescored(i, s)),
            )
        )
    base = rows[0][2]
    print(f"\n{len(query_ids)} judged queries x {len(doc_ids)} passages, all-MiniLM-L6-v2 ({dim} dims)\n")
    print("NDCG@10: gains 2^grade - 1 (the data README's 0.70); lin: linear gains (trec_eval's)\n")
    print(f"| {'type':<52} | bytes/vector | NDCG@10 | vs float | NDCG@10 lin | vs float |")
    print(f"|{'-' * 54}|-------------:|--------:|---------:|------------:|---------:|")
    for name, size, (ndcg, lin) in rows:
        print(
            f"| {name:<52} | {size:>12} | {ndcg:7.4f} | {ndcg - base[0]:+8.4f} "
            f"| {lin:11.4f} | {lin - base[1]:+8.4f} |"
        )
    print(f"\ntook {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
