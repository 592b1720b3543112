"""MAX_TEXT_CHARS (issue 22): a request that truncates has a longer text cut before tokenizing,
never refused; with truncation off it is a 422 naming the field; a chunked rerank still reads the
whole document up to its windows. On the real model, against sentence-transformers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.api.text_limits import CHARS_PER_TOKEN, fit_texts
from reranker.errors import InvalidInputError
from tests.conftest import make_settings
from tests.server import ServerThread

LIMIT = 1000
QUERY = "how long does a broken bone take to heal"
FILLER = (
    "Preheat the oven and whisk the eggs with sugar until pale, then fold in the flour and butter. "
    "The recipe calls for a pinch of salt, vanilla and lemon zest before baking the sponge. "
)
RELEVANT = "Most broken bones heal in six to eight weeks with rest and a cast."
BURIED = FILLER * 12 + RELEVANT  # about 2,200 characters, 420 tokens: the relevant part past the window
HUGE = FILLER * 300  # 54,000 characters: cut before tokenizing


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings(max_text_chars=LIMIT))) as running:
        yield running


def test_a_text_over_the_limit_is_cut_at_the_limit_or_its_token_budget_whichever_is_more() -> None:
    settings = make_settings(max_text_chars=LIMIT)
    short, over = "a" * LIMIT, "b" * 10**6
    assert fit_texts(settings, [short, over], ["x.0", "x.1"], 8, "") == [short, "b" * LIMIT]
    assert fit_texts(settings, [over], ["x.0"], 256, "")[0] == "b" * (256 * CHARS_PER_TOKEN)
    assert fit_texts(settings, [short], ["x.0"], None, "truncate is false") == [short]
    with pytest.raises(InvalidInputError) as refused:
        fit_texts(settings, [short, over], ["x.0", "x.1"], None, "truncate is false")
    assert refused.value.message.startswith(
        "x.1: 1000000 characters is over MAX_TEXT_CHARS=1000 and truncate is false"
    )


def test_truncating_requests_score_a_long_text_as_sentence_transformers_does(
    server: ServerThread, sentence_transformer
) -> None:
    query, buried, huge = sentence_transformer.encode([QUERY, BURIED, HUGE], normalize_embeddings=True)
    with server.client() as client:
        own = client.post("/rerank", json={"query": QUERY, "documents": [BURIED, HUGE]})
        openai = client.post("/v1/embeddings", json={"input": [BURIED, HUGE]})
        tei = client.post("/embed", json={"inputs": [HUGE]})
        long_query = client.post("/rerank", json={"query": HUGE, "documents": ["a cake"]})
    assert own.status_code == 200, own.text
    scores = {r["index"]: r["score"] for r in own.json()["results"]}
    assert scores == {
        0: pytest.approx(float(buried @ query), abs=1e-5),
        1: pytest.approx(float(huge @ query), abs=1e-5),
    }
    assert own.json()["usage"]["truncated_documents"] == 2
    assert openai.status_code == 200, openai.text
    got = np.array([item["embedding"] for item in openai.json()["data"]])
    np.testing.assert_allclose(got, [buried, huge], atol=1e-5)
    assert tei.status_code == 200, tei.text
    np.testing.assert_allclose(tei.json()[0], huge, atol=1e-5)
    assert long_query.status_code == 200, long_query.text


def test_a_chunked_rerank_reads_the_whole_document_up_to_its_windows(server: ServerThread) -> None:
    documents = ["The museum opens on weekends only during winter.", BURIED]
    with server.client() as client:
        chunked = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": documents, "return_details": True}
        )
        v2 = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": documents})
        job = client.post(
            "/v1/jobs", json={"type": "rerank", "input": {"query": QUERY, "documents": documents}}
        )
    assert chunked.status_code == 200, chunked.text
    best = chunked.json()["results"][0]
    assert best["index"] == 1 and best["details"]["windows"] >= 2 and not best["details"]["truncated"]
    assert v2.status_code == 200 and v2.json()["results"][0]["index"] == 1, v2.text
    assert job.status_code == 202, job.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/rerank", {"query": QUERY, "documents": ["a", BURIED], "truncate": "NONE"}, "documents.1"),
        ("/v1/rerank", {"query": BURIED, "documents": ["a"], "truncate": "NONE"}, "query"),
        (
            "/embed",
            {"batch_id": "b", "chunks": [{"chunk_id": "c", "content": BURIED}], "truncate": False},
            "chunks.0 (chunk_id 'c')",
        ),
        (
            "/v1/jobs",
            {
                "type": "embed",
                "input": {
                    "batch_id": "b",
                    "chunks": [{"chunk_id": "c", "content": BURIED}],
                    "truncate": False,
                },
            },
            "input.chunks.0 (chunk_id 'c')",
        ),
        (
            "/v1/jobs",
            {"type": "rerank", "input": {"query": QUERY, "documents": [BURIED], "truncate": "NONE"}},
            "input.documents.0",
        ),
    ],
)
def test_with_truncation_off_a_text_over_the_limit_is_a_422_naming_it(
    server: ServerThread, path: str, body: dict, field: str
) -> None:
    with server.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request", error
    assert error["message"].startswith(f"{field}: "), error
    assert f"over MAX_TEXT_CHARS={LIMIT}" in error["message"], error


def test_tei_with_truncate_false_is_a_422_in_teis_shape(server: ServerThread) -> None:
    with server.client() as client:
        embed = client.post("/embed", json={"inputs": ["a", BURIED], "truncate": False})
        rerank = client.post("/rerank", json={"query": QUERY, "texts": [BURIED], "truncate": False})
        tokenize = client.post("/tokenize", json={"inputs": BURIED})
    for response, field in ((embed, "inputs.1"), (rerank, "texts.0"), (tokenize, "inputs.0")):
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error_type"] == "Validation" and body["error"].startswith(f"{field}: "), body
