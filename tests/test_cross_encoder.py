"""A real cross-encoder (built locally from the shipped weights) served through the real loading code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.source import resolve_model_source
from tests.conftest import make_settings
from tests.server import ServerThread

QUERY = "what is the boiling point of water"
DOCUMENTS = [
    "Water boils at 100 degrees Celsius at sea level.",
    "The Amazon is the largest rainforest on Earth.",
    "At higher altitudes water boils at a lower temperature.",
    "Bicycles have two wheels.",
    "word " * 700,  # longer than the model window: truncated
]


def test_kind_is_detected_from_the_files(cross_encoder_path: Path, embedded_path: Path) -> None:
    assert (
        resolve_model_source(make_settings(local_model_path=str(cross_encoder_path))).kind
        is ModelKind.CROSS_ENCODER
    )
    assert (
        resolve_model_source(make_settings(local_model_path=str(embedded_path))).kind is ModelKind.BI_ENCODER
    )
    forced = make_settings(local_model_path=str(embedded_path), model_kind="cross-encoder")
    assert resolve_model_source(forced).kind is ModelKind.CROSS_ENCODER


def test_server_scores_equal_cross_encoder_predict_with_sigmoid(
    cross_encoder_path: Path, serving_backend: dict[str, str]
) -> None:
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(cross_encoder_path), device="cpu")
    expected = reference.predict([(QUERY, d) for d in DOCUMENTS], activation_fn=torch.nn.Sigmoid())
    app = create_app(make_settings(local_model_path=str(cross_encoder_path), **serving_backend))
    with ServerThread(app) as server, server.client() as client:
        health = client.get("/health").json()
        native = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()
        plain = {"query": QUERY, "documents": DOCUMENTS, "truncate": "END"}  # /v1 chunks by default
        cohere_shape = client.post("/v1/rerank", json=plain).json()
    assert (health["model"]["kind"], health["model"]["backend"]) == (
        "cross-encoder",
        serving_backend["backend"],
    )
    assert health["model"]["capabilities"] == ["rerank"]
    assert health["model"]["max_length"] == 512
    served = np.zeros(len(DOCUMENTS))
    for result in native["results"]:
        served[result["index"]] = result["score"]
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert [r["index"] for r in native["results"]] == [int(i) for i in np.argsort(-expected, kind="stable")]
    assert native["usage"]["truncated_documents"] == 1
    for result in cohere_shape["results"]:
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), abs=1e-4)


def test_backend_returns_raw_logits_and_leaves_the_model_untouched(cross_encoder_path: Path) -> None:
    """Our sigmoid is post-processing: the backend returns the model's raw logits."""
    from sentence_transformers import CrossEncoder

    from reranker.backends.torch_backend import TorchBackend

    source = resolve_model_source(make_settings(local_model_path=str(cross_encoder_path)))
    backend = TorchBackend(source, "cpu")
    pairs = [(QUERY, d) for d in DOCUMENTS]
    reference = CrossEncoder(str(cross_encoder_path), device="cpu")
    raw = reference.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(backend.score_pairs(pairs), raw, atol=1e-5)
    np.testing.assert_allclose(backend.score_pairs(pairs), raw, atol=1e-5)  # and again: nothing changed
