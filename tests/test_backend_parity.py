"""Every optional backend answers like torch: parity, batch invariance, the server end to end."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.factory import create_backend
from reranker.backends.source import resolve_model_source
from reranker.errors import StartupError
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings
from tests.server import ServerThread

RUNTIME = {"onnx": "onnxruntime", "mlx": "mlx"}
BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(module) is None,
            reason=f"BACKEND={name} needs {module} (requirements-backends.txt)",
        ),
    )
    for name, module in RUNTIME.items()
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backend-cache")


def pair_of_backends(backend: str, cache_dir: Path, **model: str):
    settings = make_settings(onnx_cache_dir=str(cache_dir), **model)
    reference = create_backend(settings.model_copy(update={"backend": "torch"}))
    return reference, create_backend(settings.model_copy(update={"backend": backend}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bi_encoder_vectors_equal_torch_and_ignore_batch_company(backend: str, cache_dir: Path) -> None:
    reference, other = pair_of_backends(backend, cache_dir)
    assert (other.info().backend, other.info().dimension) == (backend, reference.info().dimension)
    items = other.tokenize_texts([QUERY, *TEXTS])
    assert [i.ids for i in items] == [i.ids for i in reference.tokenize_texts([QUERY, *TEXTS])]
    np.testing.assert_allclose(other.forward(items), reference.forward(items), atol=1e-4)
    alone = other.forward(items[:1])
    with_longer = other.forward([items[0], *items[3:9]])[:1]
    np.testing.assert_allclose(alone, with_longer, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_encoder_logits_equal_torch(backend: str, cache_dir: Path, cross_encoder_path: Path) -> None:
    reference, other = pair_of_backends(backend, cache_dir, local_model_path=str(cross_encoder_path))
    pairs = other.tokenize_pairs([(QUERY, text) for text in TEXTS])
    np.testing.assert_allclose(other.forward(pairs), reference.forward(pairs), atol=1e-4)
    np.testing.assert_allclose(other.forward(pairs[1:2]), other.forward(pairs[:6])[1:2], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_ranks_like_sentence_transformers(backend: str, cache_dir: Path, sentence_transformer) -> None:
    settings = make_settings(backend=backend, onnx_cache_dir=str(cache_dir))
    with ServerThread(create_app(settings)) as server, server.client() as client:
        assert server.runtime.status.value == "healthy", server.runtime.error
        response = client.post("/rerank", json={"query": QUERY, "documents": TEXTS[:6]})
        embedded = client.post("/v1/embeddings", json={"input": TEXTS[:3], "model": "m"}).json()
        health = client.get("/health").json()
    vectors = sentence_transformer.encode([QUERY, *TEXTS[:6]], normalize_embeddings=True)
    scores = sorted((r["index"], r["score"]) for r in response.json()["results"])
    np.testing.assert_allclose([s for _, s in scores], vectors[1:] @ vectors[0], atol=1e-4)
    got = np.array([row["embedding"] for row in embedded["data"]])
    np.testing.assert_allclose(got, vectors[1:4], atol=1e-4)
    assert health["model"]["backend"] == backend


@pytest.mark.parametrize(
    ("backend", "modules", "advice"),
    [("onnx", ["onnxruntime"], "pip install onnxruntime"), ("mlx", ["mlx", "mlx.core"], "mlx[cpu]")],
)
def test_a_missing_runtime_is_a_clear_start_up_error(
    backend: str, modules: list[str], advice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # what an environment without it looks like
    settings = make_settings(backend=backend)
    with pytest.raises(StartupError, match=re.escape(advice)):
        create_backend(settings, resolve_model_source(settings))
