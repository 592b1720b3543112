"""Model kinds as strategy objects (reranker/kinds/): how each is detected, what each says of
itself, and that the layers below the HTTP routes ask the strategy instead of naming kinds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from reranker.backends.fake import FakeBackend
from reranker.kinds import KINDS, DeclaredFiles, ModelKind, detect, for_task, kind_of

ROOT = Path(__file__).resolve().parent.parent


def files(st: str | None = None, modules: tuple[str, ...] = (), arch: tuple[str, ...] = ()) -> DeclaredFiles:
    return DeclaredFiles(st, modules, arch)


POOLING = "sentence_transformers.models.Pooling"
SPLADE = "sentence_transformers.sparse_encoder.models.SpladePooling"


@pytest.mark.parametrize(
    ("declared", "kind"),
    [
        (files("CrossEncoder", (POOLING,)), ModelKind.CROSS_ENCODER),  # a declaration wins over modules
        (files("SparseEncoder"), ModelKind.SPARSE),
        (files(None, ("sentence_transformers.models.Transformer", SPLADE)), ModelKind.SPARSE),
        (files("SentenceTransformer", (SPLADE,)), ModelKind.SPARSE),  # SpladePooling is no dense pooling
        (files("SentenceTransformer"), ModelKind.BI_ENCODER),
        (files(None, (POOLING,), ("Qwen3ForCausalLM",)), ModelKind.BI_ENCODER),  # pooled: an embedder
        (files(None, (), ("BertForSequenceClassification",)), ModelKind.CROSS_ENCODER),
        (files(None, (), ("Qwen3ForCausalLM",)), ModelKind.CROSS_ENCODER),  # scored by yes/no logits
        (files(None, (), ("BertModel",)), ModelKind.BI_ENCODER),  # the default
        (files(), ModelKind.BI_ENCODER),
    ],
)
def test_detection_asks_each_kind_in_order(declared: DeclaredFiles, kind: ModelKind) -> None:
    assert detect(declared) is kind


@pytest.mark.parametrize(
    ("task", "labels", "causal", "served"),
    [
        ("auto", 1, False, ModelKind.CROSS_ENCODER),
        ("auto", 3, False, ModelKind.CLASSIFIER),
        ("rerank", 3, False, ModelKind.CROSS_ENCODER),  # the backend refuses it, naming the fix
        ("classify", 1, False, ModelKind.CLASSIFIER),
        ("classify", 1, True, None),  # a causal-LM reranker is no classifier
        ("auto", 1, True, ModelKind.CROSS_ENCODER),
    ],
)
def test_the_task_decides_between_reranker_and_classifier(
    task: str, labels: int, causal: bool, served: ModelKind | None
) -> None:
    assert for_task(ModelKind.CROSS_ENCODER, task, labels, causal) is served


def test_classify_is_refused_for_other_kinds() -> None:
    assert for_task(ModelKind.BI_ENCODER, "classify", 0, False) is None
    assert for_task(ModelKind.SPARSE, "auto", 0, False) is ModelKind.SPARSE


@pytest.mark.parametrize("kind", list(ModelKind))
def test_every_kind_is_one_consistent_strategy(kind: ModelKind) -> None:
    strategy = kind_of(kind)
    assert strategy is KINDS[kind] and strategy.name is kind and strategy.capabilities
    assert strategy.embeds == (strategy.serves("embed") or strategy.serves("embed_sparse"))
    assert strategy.takes_texts == (strategy.inputs != "pairs")
    if strategy.rerank_by == "vectors":  # a vector kind ranks by its own comparison
        assert strategy.embeds and strategy.serves("rerank")
        query = strategy.query_vector(np.array([3.0, 4.0, 0.0], dtype=np.float32))
        outputs = [np.array([[3.0, 4.0, 0.0]], dtype=np.float32), np.array([[0, 0, 1.0], [4.0, 3.0, 0]])]
        scores = strategy.document_scores(query, outputs, [1, 2])
        assert scores.dtype == np.float64 and scores[0] > scores[1]
    else:
        with pytest.raises(NotImplementedError):
            strategy.query_vector(np.zeros(3))


def test_probe_inputs_follow_the_kind() -> None:
    backend = FakeBackend()
    texts = ["first probe", "second probe text"]
    pairs = kind_of(ModelKind.CROSS_ENCODER).probe_inputs(backend, texts)
    singles = kind_of(ModelKind.CLASSIFIER).probe_inputs(backend, texts)
    assert [len(item) for item in pairs] == [4, 5]  # the first text paired with each
    assert [len(item) for item in singles] == [2, 3]


def test_backends_and_engine_ask_the_strategy_instead_of_naming_kinds() -> None:
    """No module of the server branches on a kind's name: a new kind is a module in
    reranker/kinds/ (plus its routes and tests). Defaults of a parameter may name one."""
    member = re.compile(
        r"ModelKind\.(CROSS_ENCODER|BI_ENCODER|CLASSIFIER|SPARSE)\b"
        r"|(==|!=|\bin)\s*[\"'](cross-encoder|bi-encoder|classifier|sparse)[\"']"
    )
    default = re.compile(r"(kind: ModelKind = |DEFAULT = )ModelKind\.")
    offenders = []
    for folder in ("", "api", "backends", "engine"):
        for path in sorted((ROOT / "reranker" / folder).glob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if member.search(line) and not default.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_family_table_in_the_docs_is_the_one_the_tests_run() -> None:
    """docs/MODELS.md's family table: one row per row of tests/families.py, each cell what
    tests/test_model_families.py checks (written by test_multi_backend.py --families --write-docs)."""
    from tests.families import BACKENDS, LABELS, TABLE, TABLE_END, TABLE_START, expected

    text = (ROOT / "docs" / "MODELS.md").read_text()
    block = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)]
    rows = [[cell.strip() for cell in line.strip("| ").split("|")] for line in block.strip().splitlines()[2:]]
    assert [row[0] for row in rows] == [LABELS[name] for name in TABLE]
    for name, row in zip(TABLE, rows, strict=True):
        claims = [cell.split(" ")[0] for cell in row[1:]]
        assert claims == [expected(name, backend) for backend in BACKENDS], row
