"""Long documents in /v1 and /v2 rerank: the max over overlapping windows, checked against
windows built by hand and scored in-process; truncation and refusal on request; Cohere v2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cohere
import numpy as np
import pytest
import torch

from reranker.api.app import create_app
from reranker.backends import tokenization
from tests.conftest import make_settings
from tests.server import ServerThread

QUERY = "how long does a broken bone take to heal"
FILLER = (
    "Preheat the oven and whisk the eggs with sugar until pale, then fold in the flour and butter. "
    "The recipe calls for a pinch of salt, vanilla and lemon zest before baking the sponge. "
)
RELEVANT = "Most broken bones heal in six to eight weeks with rest and a cast."
OVERLAP = 16


@pytest.fixture(scope="module")
def bi_server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings(chunk_overlap_tokens=OVERLAP))) as server:
        yield server


@pytest.fixture(scope="module")
def cross_server(cross_encoder_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(local_model_path=str(cross_encoder_path), chunk_overlap_tokens=OVERLAP)
    with ServerThread(create_app(settings)) as server:
        yield server


def windows_by_hand(tokenizer, document: str, budget: int) -> list[list[int]]:
    """The document's token ids cut into windows of ``budget`` sharing OVERLAP tokens."""
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    starts = range(0, max(len(ids) - OVERLAP, 1), budget - OVERLAP)
    return [ids[start : start + budget] for start in starts]


def test_a_cross_encoder_scores_a_document_5x_its_window_as_its_best_window(
    cross_server: ServerThread, cross_encoder_path: Path
) -> None:
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(cross_encoder_path), device="cpu")
    tokenizer, model = reference.tokenizer, reference.model.eval()
    document = FILLER * 60 + RELEVANT  # about 5 x 512 tokens
    query_ids = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    budget = 512 - len(query_ids) - 3
    windows = windows_by_hand(tokenizer, document, budget)
    assert len(windows) >= 5
    with torch.no_grad():
        logits = [
            model(
                input_ids=torch.tensor(
                    [[tokenizer.cls_token_id, *query_ids, tokenizer.sep_token_id, *w, tokenizer.sep_token_id]]
                ),
                token_type_ids=torch.tensor([[0] * (len(query_ids) + 2) + [1] * (len(w) + 1)]),
            ).logits.item()
            for w in windows
        ]
    expected = 1 / (1 + np.exp(-max(logits)))
    body = {"query": QUERY, "documents": [document, "short", FILLER * 30], "return_details": True}
    with cross_server.client() as client:
        batches_before = client.get("/metrics").json()["batches_run"]
        answer = client.post("/v1/rerank", json=body | {"max_chunks_per_doc": 20})
        batches = client.get("/metrics").json()["batches_run"] - batches_before
    result = next(r for r in answer.json()["results"] if r["index"] == 0)
    assert result["relevance_score"] == pytest.approx(expected, abs=1e-4)
    assert result["details"] == {"windows": len(windows), "chunked": True, "truncated": False}
    windows_run = sum(r["details"]["windows"] for r in answer.json()["results"])
    assert batches < windows_run / 2  # the windows of both long documents share batches
    assert int(answer.headers["x-batch-size"]) > len(windows)


def test_a_bi_encoder_scores_a_long_document_by_its_best_window(
    bi_server: ServerThread, sentence_transformer
) -> None:
    tokenizer = sentence_transformer.tokenizer
    document = FILLER * 20 + RELEVANT
    windows = windows_by_hand(tokenizer, document, 256 - 2)
    features = [
        {"input_ids": torch.tensor([[tokenizer.cls_token_id, *w, tokenizer.sep_token_id]])} for w in windows
    ]
    with torch.no_grad():
        vectors = [
            sentence_transformer({**f, "attention_mask": torch.ones_like(f["input_ids"])})[
                "sentence_embedding"
            ][0]
            for f in features
        ]
    query = sentence_transformer.encode(QUERY, convert_to_tensor=True)
    expected = max(float(torch.nn.functional.cosine_similarity(query, v, dim=0)) for v in vectors)
    with bi_server.client() as client:
        answer = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": [document], "return_details": True}
        )
    (result,) = answer.json()["results"]
    assert result["relevance_score"] == pytest.approx(expected, abs=1e-4)
    assert result["details"]["windows"] == len(windows)


def test_a_relevant_passage_buried_at_the_end_ranks_first_only_when_chunked(bi_server: ServerThread) -> None:
    documents = [
        "The museum opens on weekends only during winter.",
        FILLER * 12 + RELEVANT,
        "The train to Berlin leaves at nine in the morning.",
    ]
    with bi_server.client() as client:
        chunked = client.post("/v1/rerank", json={"query": QUERY, "documents": documents}).json()
        truncated = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": documents, "truncate": "END"}
        ).json()
        refused = client.post("/v1/rerank", json={"query": QUERY, "documents": documents, "truncate": "none"})
    assert chunked["results"][0]["index"] == 1
    assert [r["index"] for r in truncated["results"]][-1] == 1
    assert "scored as the best of their overlapping windows" in chunked["meta"]["warnings"][0]
    assert "truncated" in truncated["meta"]["warnings"][0]
    assert refused.status_code == 422 and "documents.1" in refused.json()["error"]["message"]


def test_max_chunks_per_doc_caps_the_windows_and_says_so(bi_server: ServerThread) -> None:
    body = {
        "query": QUERY,
        "documents": [FILLER * 20 + RELEVANT],
        "max_chunks_per_doc": 2,
        "return_details": True,
    }
    with bi_server.client() as client:
        answer = client.post("/v1/rerank", json=body).json()
    assert answer["results"][0]["details"] == {"windows": 2, "chunked": True, "truncated": True}
    assert any("truncated" in w for w in answer["meta"]["warnings"])


def test_cohere_v2_sdk_round_trip(bi_server: ServerThread, sentence_transformer) -> None:
    documents = ["Bones heal in six to eight weeks.", "Paris is in France.", FILLER * 12 + RELEVANT]
    client = cohere.ClientV2(base_url=bi_server.url, api_key="unused")
    response = client.rerank(model="all-MiniLM-L6-v2", query=QUERY, documents=documents, top_n=2)
    assert [r.index for r in response.results] == [0, 2]  # the buried passage beats Paris
    vectors = sentence_transformer.encode([QUERY, documents[0]], normalize_embeddings=True)
    assert response.results[0].relevance_score == pytest.approx(float(vectors[1] @ vectors[0]), abs=1e-5)
    assert response.meta.api_version.version == "2" and response.meta.tokens.input_tokens > 200
    cut = client.rerank(model="m", query=QUERY, documents=documents, max_tokens_per_doc=20)
    score = {r.index: r.relevance_score for r in cut.results}
    full = {r.index: r.relevance_score for r in response.results}
    assert score[2] < full[2] - 0.1  # the relevant end is past its first 20 tokens: not scored
    assert any("max_tokens_per_doc=20" in w for w in cut.meta.warnings)


def test_v2_requires_a_model(bi_server: ServerThread) -> None:
    with bi_server.client() as client:
        answer = client.post("/v2/rerank", json={"query": QUERY, "documents": ["a"]})
    assert answer.status_code == 422 and "model" in answer.json()["error"]["message"]


WEATHER = (
    "The weather today is mild with light winds and scattered clouds, and tomorrow brings more of the same. "
)
BERLIN = "Berlin has a population of about 3.8 million people."
BERLIN_QUERY = "What is the population of Berlin?"
HAMBURG = "Hamburg has a large port."


def test_rerank_window_tokens_keeps_a_short_passage_from_being_diluted(
    bi_server: ServerThread, sentence_transformer
) -> None:
    """Issue 16's example: a Berlin-population sentence after ~240 tokens of weather filler,
    mean-pooled in one 256-token window, ranks below an unrelated Hamburg sentence; windows of
    RERANK_WINDOW_TOKENS=64 tokens rank it first. Its score is the best window's cosine,
    computed in-process on the same token ids."""
    document = WEATHER * 12 + BERLIN
    body = {"query": BERLIN_QUERY, "documents": [document, HAMBURG], "return_details": True}
    with bi_server.client() as client:
        whole = client.post("/v1/rerank", json=body).json()["results"]
    settings = make_settings(chunk_overlap_tokens=OVERLAP, rerank_window_tokens=64)
    with ServerThread(create_app(settings)) as small_windows, small_windows.client() as client:
        windowed = client.post("/v1/rerank", json=body).json()["results"]
        windows = small_windows.runtime.backend.text_windows([document], OVERLAP, 10, 64)[0].items
    assert [r["index"] for r in whole] == [1, 0]  # diluted: Hamburg first
    assert whole[0]["details"]["windows"] == 1
    assert [r["index"] for r in windowed] == [0, 1]  # Berlin's own window wins
    assert windowed[0]["details"]["windows"] == len(windows) > 3 and max(len(w) for w in windows) <= 64
    query = sentence_transformer.encode([BERLIN_QUERY], normalize_embeddings=True)[0]
    best = -1.0
    with torch.no_grad():
        for window in windows:
            features = {
                "input_ids": torch.tensor([list(window.ids)]),
                "token_type_ids": torch.tensor([list(window.type_ids)]),
                "attention_mask": torch.ones(1, len(window), dtype=torch.long),
            }
            vector = sentence_transformer(features)["sentence_embedding"][0].numpy()
            best = max(best, float(vector @ query / np.linalg.norm(vector)))
    assert windowed[0]["relevance_score"] == pytest.approx(best, abs=1e-5)
    hamburg = {r["index"]: r["relevance_score"] for r in whole}[1]
    assert {r["index"]: r["relevance_score"] for r in windowed}[1] == pytest.approx(hamburg, abs=1e-6)


def test_a_long_query_is_tokenized_with_the_documents_in_one_call_and_cut_as_alone(
    bi_server: ServerThread, sentence_transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bi-encoder's rerank tokenizes the query and the documents in one tokenizer call (the
    documents' windows begin as the query's plain cut does); the query over the window is cut at
    the model's 256 tokens, as sentence-transformers cuts it, whether the documents are chunked."""
    calls: list[int] = []
    encode_all = tokenization._encode_all

    def counted(tokenizer, inputs, *args, **options):  # type: ignore[no-untyped-def]
        calls.append(len(inputs))
        return encode_all(tokenizer, inputs, *args, **options)

    monkeypatch.setattr(tokenization, "_encode_all", counted)
    query = QUERY + " " + FILLER * 8  # over 256 tokens
    documents = [RELEVANT, FILLER * 12 + RELEVANT]
    vectors = sentence_transformer.encode([query, RELEVANT], normalize_embeddings=True)
    expected = float(vectors[1] @ vectors[0])
    with bi_server.client() as client:
        for truncate in ("END", None):  # documents cut, then chunked (the default)
            body = {"query": query, "documents": documents, "return_details": True}
            answer = client.post("/v1/rerank", json=body | ({"truncate": truncate} if truncate else {}))
            scores = {r["index"]: r for r in answer.json()["results"]}
            assert scores[0]["relevance_score"] == pytest.approx(expected, abs=1e-5)
            assert (scores[1]["details"]["windows"] > 1) is (truncate is None)
    assert calls == [3, 3]
