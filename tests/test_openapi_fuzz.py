"""Fuzz every endpoint of /openapi.json with schemathesis, against the real server on the real model.

Bounded examples per operation (the whole module runs in well under 2 minutes): no 5xx,
every status and body as documented, and the server still healthy and right afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from reranker.api.app import create_app
from reranker.api.openapi import openapi_document
from tests.conftest import make_settings
from tests.server import ServerThread

LIMITS = {
    "max_documents_per_request": 8,
    "max_texts_per_embed_request": 8,
    "max_text_chars": 300,
    "max_request_bytes": 65536,
    "body_read_timeout_s": 5,
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings(**LIMITS))) as server:
        yield server


DOCUMENT = openapi_document(make_settings(**LIMITS), protected=False)
OPERATIONS = {
    result.ok().label: result.ok() for result in schemathesis.openapi.from_dict(DOCUMENT).get_all_operations()
}
# Valid inputs everywhere; schema-breaking ones where there is an input to break (a body or a query).
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label, op in OPERATIONS.items() if op.body or op.query
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_no_500_and_every_answer_matches_its_schema(
    label: str, mode: GenerationMode, fuzzed_server: ServerThread
) -> None:
    """Valid inputs (positive) and schema-breaking ones (negative), 50 examples each."""

    @hypothesis.given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=50,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure reproduces
        suppress_health_check=list(hypothesis.HealthCheck),
        database=None,
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzzed_server.url, checks=CHECKS, timeout=60)

    fuzz()


def test_the_server_is_healthy_and_right_after_the_fuzzing(
    fuzzed_server: ServerThread, sentence_transformer
) -> None:
    import numpy as np

    with fuzzed_server.client() as client:
        served_document = client.get("/openapi.json").json()
        health = client.get("/health")
        metrics = client.get("/metrics").json()
        answer = client.post(
            "/rerank", json={"query": "bone healing", "documents": ["Bones heal in weeks.", "Paris"]}
        )
    assert served_document == DOCUMENT  # the fuzzed document is the one the server serves
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert metrics["total_requests"] > 100, metrics[
        "total_requests"
    ]  # the fuzzing did reach the model routes
    assert metrics["failed_requests"].get("internal_error", 0) == 0
    vectors = sentence_transformer.encode(
        ["bone healing", "Bones heal in weeks.", "Paris"], normalize_embeddings=True
    )
    scores = sorted((r["index"], r["score"]) for r in answer.json()["results"])
    np.testing.assert_allclose([s for _, s in scores], vectors[1:] @ vectors[0], atol=1e-5)
