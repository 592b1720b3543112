"""The real server on the embedded model, checked against in-process sentence-transformers."""

from __future__ import annotations

import concurrent.futures

import cohere
import numpy as np
import pytest

from tests.server import ServerThread

QUERY = "How long does it take for a broken bone to heal?"
RELEVANT = "A broken bone usually heals in six to eight weeks, although it can take longer in older adults."
DISTRACTORS = [
    "The stock market closed higher on Friday after strong earnings reports.",
    "Paris is the capital and most populous city of France.",
    "To bake sourdough bread you need flour, water, salt and a starter.",
    "The Great Barrier Reef is the world's largest coral reef system.",
    "Python is a programming language that lets you work quickly.",
    "Volcanoes erupt when magma rises to the surface of the earth.",
    "The violin is a wooden string instrument in the violin family.",
]


def cosine_oracle(model, query: str, documents: list[str]) -> np.ndarray:
    vectors = model.encode([query, *documents], convert_to_numpy=True, normalize_embeddings=True)
    return vectors[1:] @ vectors[0]


def scores_by_index(results: list[dict], key: str = "score") -> np.ndarray:
    out = np.zeros(len(results))
    for result in results:
        out[result["index"]] = result[key]
    return out


def test_relevant_document_ranks_first(embedded_server: ServerThread) -> None:
    documents = [*DISTRACTORS[:3], RELEVANT, *DISTRACTORS[3:]]
    with embedded_server.client() as client:
        response = client.post(
            "/rerank", json={"query": QUERY, "documents": documents, "return_documents": True}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["results"][0]["index"] == 3
    assert body["results"][0]["document"] == RELEVANT
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["usage"]["documents"] == len(documents)
    assert body["model"] == "all-MiniLM-L6-v2"


def test_scores_equal_in_process_cosine(embedded_server: ServerThread, sentence_transformer) -> None:
    documents = [RELEVANT, *DISTRACTORS, "short", "x " * 600]  # includes a truncated document
    with embedded_server.client() as client:
        body = client.post("/rerank", json={"query": QUERY, "documents": documents}).json()
    served = scores_by_index(body["results"])
    expected = cosine_oracle(sentence_transformer, QUERY, documents)
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert body["usage"]["truncated_documents"] == 1


def test_top_k_limits_results(embedded_server: ServerThread) -> None:
    with embedded_server.client() as client:
        body = client.post(
            "/rerank", json={"query": QUERY, "documents": [RELEVANT, *DISTRACTORS], "top_k": 2}
        )
    results = body.json()["results"]
    assert len(results) == 2 and results[0]["index"] == 0


def test_batch_invariance_alone_and_among_16_concurrent(embedded_server: ServerThread) -> None:
    documents = [RELEVANT, *DISTRACTORS]
    request = {"query": QUERY, "documents": documents}
    rng = np.random.default_rng(7)
    words = " ".join(DISTRACTORS).split()
    others = [
        {
            "query": " ".join(rng.choice(words, 5)),
            "documents": [" ".join(rng.choice(words, n)) for n in (3, 20, 60)],
        }
        for _ in range(16)
    ]
    with embedded_server.client() as client:
        alone = scores_by_index(client.post("/rerank", json=request).json()["results"])
        before = client.get("/metrics").json()
        with concurrent.futures.ThreadPoolExecutor(17) as pool:
            crowd = [pool.submit(client.post, "/rerank", json=body) for body in others]
            crowded_response = pool.submit(client.post, "/rerank", json=request).result()
            assert all(f.result().status_code == 200 for f in crowd)
        after = client.get("/metrics").json()
    crowded = scores_by_index(crowded_response.json()["results"])
    batches = after["batches_run"] - before["batches_run"]
    items = after["items_processed"] - before["items_processed"]
    # The items of 17 concurrent requests ran in shared, multi-item batches (how they were grouped
    # depends on the backend's fitted cost; tests/test_exact_default.py proves cross-request
    # sharing with length grouping off).
    assert batches < items, (batches, items)
    # Same ranking, same scores up to float32 rounding of different padding widths.
    np.testing.assert_allclose(crowded, alone, rtol=0, atol=1e-6)
    assert list(np.argsort(-crowded)) == list(np.argsort(-alone))


def test_cohere_sdk_round_trip(embedded_server: ServerThread, sentence_transformer) -> None:
    documents = [*DISTRACTORS[:2], RELEVANT, *DISTRACTORS[2:]]
    client = cohere.Client(base_url=embedded_server.url, api_key="unused")
    response = client.rerank(
        model="all-MiniLM-L6-v2", query=QUERY, documents=documents, top_n=3, return_documents=True
    )
    assert response.results[0].index == 2
    assert len(response.results) == 3
    assert response.results[0].document is not None
    assert response.results[0].document.text == RELEVANT
    expected = cosine_oracle(sentence_transformer, QUERY, documents)
    for result in response.results:
        assert result.relevance_score == pytest.approx(float(expected[result.index]), abs=1e-4)
    assert response.id


def test_v1_rank_fields_rank_object_documents(embedded_server: ServerThread) -> None:
    documents = [
        {"title": "Finance", "text": DISTRACTORS[0]},
        {"title": "Medicine", "text": RELEVANT},
    ]
    with embedded_server.client() as client:
        body = client.post(
            "/v1/rerank",
            json={
                "query": QUERY,
                "documents": documents,
                "rank_fields": ["title", "text"],
                "return_documents": True,
            },
        ).json()
    assert body["results"][0]["index"] == 1
    assert body["results"][0]["document"] == documents[1]
    assert body["meta"]["billed_units"]["search_units"] == 1


def test_health_and_metrics_describe_the_server(
    embedded_server: ServerThread, serving_backend: dict[str, str]
) -> None:
    with embedded_server.client() as client:
        client.post("/rerank", json={"query": QUERY, "documents": [RELEVANT]})
        health = client.get("/health")
        metrics = client.get("/metrics").json()
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").json() == {"status": "ready"}
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    details = body["model"].pop("details")
    precision = "" if serving_backend["backend"] == "onnx" else "; DTYPE=float32"  # ONNX: ONNX_QUANTIZE says
    assert body["model"].pop("selected_because") == f"BACKEND={serving_backend['backend']}{precision}"
    family = body["model"].pop("family")  # MLX reports it once it builds ModelInfo with layout_facts
    # What loading it added to the process: in this shared test process other servers trim
    # and grow it meanwhile (tests/test_cli.py checks the figure in a process of its own).
    assert body["model"].pop("memory_bytes") >= 0
    assert (
        body["model"].pop("embedding_calibration")["source"] == "probe"
    )  # int8/uint8 ranges: built-in texts
    assert family == "bert" or (serving_backend["backend"] == "mlx" and family == "")
    assert body["model"] == {
        "name": "all-MiniLM-L6-v2",
        "kind": "bi-encoder",
        "backend": serving_backend["backend"],
        "device": "cpu",
        "max_length": 256,
        "dimension": 384,
        "dtype": "float32",
        "capabilities": ["rerank", "embed"],
        "activation": None,  # a bi-encoder's score is a cosine
        "prompts": {},
        "default_prompt_name": None,
        "instruction": None,
    }
    if serving_backend["backend"] == "onnx":
        assert details["onnx_origin"] == "exported" and details["onnx_file"].endswith("-fp32.onnx")
        assert details["agreement_with_torch"].startswith("worst cosine 1.0000")
    assert body["controller"]["batch_size"] == 32
    assert metrics["successful_requests"] >= 1
    assert metrics["items_processed"] >= 2
    assert metrics["latency_ms"]["p50"] > 0
    assert 0 < metrics["success_rate"] <= 1
