"""Text-embeddings-inference (TEI) clients, unmodified, with the server root as their base URL:
llama-index's TEI rerank and embeddings, haystack's HuggingFaceTEIRanker and
HuggingFaceAPITextEmbedder, huggingface_hub's InferenceClient; plus TEI's /info, /tokenize and
error shape, and this server's own /rerank and /embed shapes beside them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no calls home from the test run

from reranker.api.app import create_app
from tests.client_texts import BEST, DOCUMENTS, QUERY
from tests.conftest import make_settings
from tests.server import ServerThread


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings())) as running:
        yield running


@pytest.fixture
def hub_client_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub refuses every request under HF_HUB_OFFLINE=1, this loopback server's too:
    let its InferenceClient through for one test (the model is loaded already, from the package)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def own_vectors(server: ServerThread, texts: list[str], normalize: bool = True) -> np.ndarray:
    """What this server's own /embed answers for ``texts``: the oracle of every TEI embedding."""
    chunks = [{"chunk_id": str(i), "content": text} for i, text in enumerate(texts)]
    with server.client() as client:
        response = client.post("/embed", json={"batch_id": "b", "chunks": chunks, "normalize": normalize})
    assert response.status_code == 200, response.text
    return np.array([item["vector"] for item in response.json()["vectors"]])


def test_llama_index_tei_rerank(server: ServerThread) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    reranker = TextEmbeddingInference(base_url=server.url, top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=text)) for text in DOCUMENTS]
    ranked = reranker.postprocess_nodes(nodes, QueryBundle(QUERY))
    assert ranked[0].node.get_content() == DOCUMENTS[BEST]
    assert len(ranked) == 2 and ranked[0].score > ranked[1].score


def test_llama_index_tei_embeddings(server: ServerThread) -> None:
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    embedder = TextEmbeddingsInference(model_name="all-MiniLM-L6-v2", base_url=server.url)
    vectors = np.array(embedder.get_text_embedding_batch(DOCUMENTS))
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, own_vectors(server, DOCUMENTS), atol=1e-6)
    query = np.array(embedder.get_query_embedding(QUERY))
    assert int(np.argmax(vectors @ query)) == BEST


def test_haystack_tei_ranker(server: ServerThread) -> None:
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=server.url, top_k=3, token=None)
    ranked = ranker.run(query=QUERY, documents=[Document(content=text) for text in DOCUMENTS])["documents"]
    assert ranked[0].content == DOCUMENTS[BEST]
    assert [doc.score for doc in ranked] == sorted((doc.score for doc in ranked), reverse=True)


@pytest.mark.usefixtures("hub_client_online")
def test_haystack_api_text_embedder(server: ServerThread) -> None:
    from haystack_integrations.components.embedders.huggingface_api import HuggingFaceAPITextEmbedder

    embedder = HuggingFaceAPITextEmbedder(
        api_type="text_embeddings_inference", api_params={"url": server.url}, normalize=True, token=None
    )
    vector = np.array(embedder.run(text=DOCUMENTS[0])["embedding"])
    assert vector.shape == (384,)
    np.testing.assert_allclose(vector, own_vectors(server, DOCUMENTS[:1])[0], atol=1e-6)


@pytest.mark.usefixtures("hub_client_online")
def test_huggingface_hub_inference_client_feature_extraction(server: ServerThread) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    vector = np.asarray(client.feature_extraction(DOCUMENTS[1], normalize=False))
    assert vector.shape == (1, 384)
    np.testing.assert_allclose(vector, own_vectors(server, DOCUMENTS[1:2], normalize=False), atol=1e-6)
    assert abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3  # not normalised: as asked


@pytest.mark.usefixtures("hub_client_online")
def test_tei_embed_applies_dimensions_as_tei_does(server: ServerThread) -> None:
    """Issue 22: /embed ignored ``dimensions``. TEI keeps the first N values, then normalises
    (only when ``normalize`` is true); 0 or more than the model's size is a 422."""
    from huggingface_hub import InferenceClient

    raw = own_vectors(server, DOCUMENTS[:1], normalize=False)[0]
    client = InferenceClient(base_url=server.url)
    cut = np.asarray(client.feature_extraction(DOCUMENTS[0], dimensions=128))
    assert cut.shape == (1, 128)
    np.testing.assert_allclose(cut[0], raw[:128] / np.linalg.norm(raw[:128]), atol=1e-6)
    with server.client() as http:
        plain = http.post("/embed", json={"inputs": DOCUMENTS[0], "dimensions": 64, "normalize": False})
        zero = http.post("/embed", json={"inputs": "x", "dimensions": 0})
        too_many = http.post("/embed", json={"inputs": "x", "dimensions": 385})
    assert plain.status_code == 200, plain.text
    np.testing.assert_allclose(plain.json()[0], raw[:64], atol=1e-6)
    for response in (zero, too_many):
        assert response.status_code == 422 and "dimensions" in response.json()["error"], response.text
        assert response.json()["error_type"] == "Validation"


def test_tei_rerank_options_and_own_shape_side_by_side(server: ServerThread) -> None:
    with server.client() as client:
        tei = client.post(
            "/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True, "raw_scores": True}
        )
        ours = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        top_n = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 1})
    assert tei.status_code == 200 and ours.status_code == 200 and top_n.status_code == 200
    ranked = tei.json()
    assert isinstance(ranked, list) and ranked[0] == {
        "index": BEST,
        "score": pytest.approx(ours.json()["results"][0]["score"]),  # bi-encoder: raw = cosine
        "text": DOCUMENTS[BEST],
    }
    assert [r["index"] for r in ours.json()["results"]] == [r["index"] for r in ranked]
    assert [r["index"] for r in top_n.json()["results"]] == [BEST]  # Cohere's name honoured


def test_tei_embed_options(server: ServerThread) -> None:
    with server.client() as client:
        single = client.post("/embed", json={"inputs": "hello", "normalize": False, "truncate": True})
        long = client.post("/embed", json={"inputs": ["word " * 400], "truncate": False})
        prompt = client.post("/embed", json={"inputs": "hello", "prompt_name": "query"})
        empty = client.post("/embed", json={"inputs": []})
    assert single.status_code == 200 and len(single.json()) == 1 and len(single.json()[0]) == 384
    np.testing.assert_allclose(
        single.json()[0], own_vectors(server, ["hello"], normalize=False)[0], atol=1e-6
    )
    for response, needle in ((long, "inputs.0"), (prompt, "prompt_name"), (empty, "inputs")):
        assert response.status_code == 422
        body = response.json()
        assert body["error_type"] == "Validation" and needle in body["error"], body


def test_tei_info_and_tokenize(server: ServerThread) -> None:
    with server.client() as client:
        info = client.get("/info").json()
        tokens = client.post("/tokenize", json={"inputs": ["hello world"]}).json()
        bare = client.post("/tokenize", json={"inputs": "hello world", "add_special_tokens": False}).json()
        prompt = client.post("/tokenize", json={"inputs": "hello", "prompt_name": "query"})
    assert info["model_id"] == "all-MiniLM-L6-v2" and info["max_input_length"] == 256
    assert "embedding" in info["model_type"]
    assert [t["text"] for t in tokens[0]] == ["[CLS]", "hello", "world", "[SEP]"]
    assert [t["text"] for t in bare[0]] == ["hello", "world"]
    assert prompt.status_code == 422 and prompt.json()["error_type"] == "Validation"  # MiniLM has none
    assert "prompt_name" in prompt.json()["error"], prompt.text
    assert tokens[0][2] == {
        "id": tokens[0][2]["id"],
        "text": "world",
        "special": False,
        "start": 6,
        "stop": 11,
    }
