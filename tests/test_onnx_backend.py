"""BACKEND=onnx: the exported model answers like the torch one (parity, batch invariance, cache)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.factory import create_backend
from reranker.backends.source import resolve_model_source
from reranker.errors import StartupError
from tests.conftest import make_settings
from tests.server import ServerThread

pytest.importorskip("onnxruntime", reason="BACKEND=onnx needs onnxruntime (requirements-backends.txt)")

QUERY = "how long does a broken bone take to heal"
TEXTS = [
    "Most broken bones heal in six to eight weeks.",
    "Paris is the capital of France.",
    "A fracture in a child heals faster than in an adult, often within a month of rest.",
    "Bananas are rich in potassium.",
    "Physiotherapy after a cast helps the muscles around a healed bone recover.",
    "The stock market closed higher on Friday after a volatile week.",
    "Calcium and vitamin D support bone repair.",
    "A hip fracture in an elderly patient may need surgery and months of rehabilitation.",
    "Python is a popular programming language for data science.",
    "Smoking slows the healing of fractures.",
    "The Great Wall of China is visible from low orbit only under ideal conditions.",
    "A cast immobilises the limb so that the bone ends can knit together.",
    "Whales are mammals that breathe air through a blowhole.",
    "Stress fractures in runners usually heal with six weeks of reduced activity.",
    "The recipe needs two cups of flour and one egg.",
    "X-rays show whether new bone has formed across the fracture line.",
    "Jupiter is the largest planet in the solar system.",
    "Compound fractures carry a risk of infection and heal more slowly.",
    "The train to Berlin leaves at nine in the morning.",
    "Bone remodelling can continue for a year after the break has healed.",
    "Tea contains caffeine and antioxidants.",
    "A broken wrist is one of the most common fractures in adults.",
    "The museum opens on weekends only during winter.",
    "Diabetes can delay the healing of broken bones.",
    "Electric cars are charged from the grid or from solar panels.",
    "Pain usually eases within two weeks of a fracture being set.",
    "Mount Everest is the highest mountain above sea level.",
    "Older adults heal more slowly than young people.",
    "The violin has four strings tuned in fifths.",
    "Return to sport after a broken leg often takes three to six months.",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def backends(cache_dir: Path, quantize: str = "none", **model: str):
    settings = make_settings(onnx_cache_dir=str(cache_dir), onnx_quantize=quantize, **model)
    torch_backend = create_backend(settings.model_copy(update={"backend": "torch"}))
    return torch_backend, create_backend(settings.model_copy(update={"backend": "onnx"}))


def test_bi_encoder_vectors_equal_torch_and_do_not_depend_on_batch_company(cache_dir: Path) -> None:
    reference, onnx = backends(cache_dir)
    assert (onnx.info().backend, onnx.info().dtype) == ("onnx", "float32")
    items = onnx.tokenize_texts([QUERY, *TEXTS])
    np.testing.assert_allclose(onnx.forward(items), reference.forward(items), atol=1e-4)
    alone = onnx.forward(items[:1])
    with_longer = onnx.forward([items[0], *items[3:9]])[:1]
    np.testing.assert_allclose(alone, with_longer, atol=1e-5)


def test_export_is_cached_and_reused(cache_dir: Path) -> None:
    _, first = backends(cache_dir)
    _, second = backends(cache_dir)
    assert not second.exported and second.path == first.path and first.path.parent == cache_dir


def test_cross_encoder_logits_equal_torch(cache_dir: Path, cross_encoder_path: Path) -> None:
    reference, onnx = backends(cache_dir, local_model_path=str(cross_encoder_path))
    pairs = onnx.tokenize_pairs([(QUERY, text) for text in TEXTS])
    np.testing.assert_allclose(onnx.forward(pairs), reference.forward(pairs), atol=1e-4)
    alone = onnx.forward(pairs[1:2])
    np.testing.assert_allclose(alone, onnx.forward(pairs[:6])[1:2], atol=1e-5)


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def test_int8_vectors_stay_close_and_keep_the_ranking(cache_dir: Path) -> None:
    reference, int8 = backends(cache_dir, quantize="int8")
    assert int8.info().dtype == "int8"
    items = int8.tokenize_texts([QUERY, *TEXTS])
    got, want = int8.forward(items), reference.forward(items)
    cosines = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.mean() >= 0.99, cosines
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    scores_int8 = unit(got)[1:] @ unit(got)[0]
    scores_fp32 = unit(want)[1:] @ unit(want)[0]
    spearman = np.corrcoef(ranks(scores_int8), ranks(scores_fp32))[0, 1]
    assert spearman >= 0.95, spearman


def test_server_on_onnx_ranks_like_sentence_transformers(cache_dir: Path, sentence_transformer) -> None:
    settings = make_settings(backend="onnx", onnx_cache_dir=str(cache_dir))
    with ServerThread(create_app(settings)) as server, server.client() as client:
        assert server.runtime.status.value == "healthy", server.runtime.error
        response = client.post("/rerank", json={"query": QUERY, "documents": TEXTS[:4]})
        health = client.get("/health").json()
    vectors = sentence_transformer.encode([QUERY, *TEXTS[:4]], normalize_embeddings=True)
    expected = vectors[1:] @ vectors[0]
    scores = sorted((r["index"], r["score"]) for r in response.json()["results"])
    np.testing.assert_allclose([s for _, s in scores], expected, atol=1e-4)
    assert (health["model"]["backend"], health["model"]["dtype"]) == ("onnx", "float32")


def test_missing_onnxruntime_is_a_clear_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it looks like
    settings = make_settings(backend="onnx")
    with pytest.raises(StartupError, match="pip install onnxruntime"):
        create_backend(settings, resolve_model_source(settings))
