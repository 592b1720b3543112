"""The model kinds beyond bi-encoders and rerankers: classifiers on TEI's /predict and POST /,
Infinity's /infinity/classify; SPLADE sparse models on /embed_sparse, /embed and /rerank.
Tiny models built in the session (tests/kind_models.py), each against its in-process library."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.errors import StartupError
from tests.conftest import make_settings
from tests.kind_models import SENTIMENT, TOPICS, classifier, classifier_logits, splade
from tests.server import ServerThread

TEXTS = ["the weather in berlin is warm today", "rain", "what is the population of paris"]
PAIR = ("what is the capital of germany", "berlin is the capital of germany")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "sentiment": classifier(root / "sentiment"),
        "topics": classifier(root / "topics", TOPICS, multi_label=True),
        "splade": splade(root / "splade"),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, Path], embedded_path: Path) -> Iterator[ServerThread]:
    listed = ",".join(f"{name}={path}" for name, path in models.items())
    with ServerThread(create_app(make_settings(models=f"{listed},embed={embedded_path}"))) as running:
        assert running.runtime.status.value == "healthy", running.runtime.error
        yield running


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def by_label(answer: list[dict]) -> dict[str, float]:
    return {item["label"]: item["score"] for item in answer}


def test_classifier_kinds_are_detected_with_their_labels(server: ServerThread) -> None:
    health = server.client().get("/health").json()["models"]
    assert health["sentiment"]["kind"] == "classifier"
    assert health["sentiment"]["capabilities"] == ["classify"]
    assert health["topics"]["kind"] == "classifier"
    assert health["splade"]["kind"] == "sparse" and health["splade"]["capabilities"] == [
        "embed_sparse",
        "rerank",
    ]


def test_predict_equals_transformers_for_texts_pairs_and_batches(server: ServerThread, models) -> None:
    expected = softmax(classifier_logits(models["sentiment"], [*TEXTS, PAIR]))
    with server.client() as client:
        one = client.post("/models/sentiment/predict", json={"inputs": TEXTS[0]}).json()
        pair = client.post("/models/sentiment/predict", json={"inputs": list(PAIR)}).json()
        batch = client.post(
            "/models/sentiment/predict", json={"inputs": [[text] for text in TEXTS] + [list(PAIR)]}
        ).json()
        raw = client.post("/models/sentiment/predict", json={"inputs": TEXTS[0], "raw_scores": True}).json()
        default = client.post("/predict", json={"inputs": TEXTS[0]}).json()  # the first classifier
    assert [item["score"] for item in one] == sorted((item["score"] for item in one), reverse=True)
    assert set(by_label(one)) == set(SENTIMENT)
    np.testing.assert_allclose([by_label(one)[label] for label in SENTIMENT], expected[0], atol=1e-5)
    np.testing.assert_allclose([by_label(pair)[label] for label in SENTIMENT], expected[3], atol=1e-5)
    assert len(batch) == 4
    for row, want in zip(batch, expected, strict=True):
        np.testing.assert_allclose([by_label(row)[label] for label in SENTIMENT], want, atol=1e-5)
    logits = classifier_logits(models["sentiment"], [TEXTS[0]])[0]
    np.testing.assert_allclose([by_label(raw)[label] for label in SENTIMENT], logits, atol=1e-5)
    assert default == one


def test_multi_label_classifier_scores_each_label_with_a_sigmoid(server: ServerThread, models) -> None:
    logits = classifier_logits(models["topics"], TEXTS)
    with server.client() as client:
        answer = client.post("/infinity/classify", json={"model": "topics", "input": TEXTS}).json()
    assert answer["object"] == "classify" and answer["model"] == "topics"
    for row, want in zip(answer["data"], 1 / (1 + np.exp(-logits)), strict=True):
        np.testing.assert_allclose([by_label(row)[label] for label in TOPICS], want, atol=1e-5)


def test_predict_refuses_bad_shapes_and_long_inputs_by_name(server: ServerThread) -> None:
    with server.client() as client:
        three = client.post("/predict", json={"inputs": ["a", "b", "c"]})
        empty = client.post("/predict", json={"inputs": []})
        long = client.post("/predict", json={"inputs": [["x"], ["word " * 600]], "truncate": False})
        embed_on_classifier = client.post("/v1/embeddings", json={"model": "sentiment", "input": "x"})
    assert three.status_code == 422 and "one pair" in three.json()["error"]
    assert empty.status_code == 422
    assert long.status_code == 422 and "inputs.1" in long.json()["error"]
    assert embed_on_classifier.status_code == 400
    assert "models that can: ['embed']" in embed_on_classifier.json()["error"]["message"]


def test_huggingface_hub_text_classification_against_root(models: dict[str, Path], monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", False
    )  # the model is loaded: a loopback call

    with ServerThread(create_app(make_settings(local_model_path=str(models["sentiment"])))) as one:
        result = InferenceClient(base_url=one.url).text_classification(TEXTS[0])
    expected = softmax(classifier_logits(models["sentiment"], [TEXTS[0]]))[0]
    best = int(np.argmax(expected))
    assert result[0].label == SENTIMENT[best] and len(result) == len(SENTIMENT)
    np.testing.assert_allclose(
        [by_label([vars(i) for i in result])[label] for label in SENTIMENT], expected, atol=1e-5
    )


def sparse_reference(path: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    encoded = SparseEncoder(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    return encoded.to_dense().numpy()


def test_embed_sparse_equals_sparse_encoder(server: ServerThread, models) -> None:
    expected = sparse_reference(models["splade"], TEXTS)
    with server.client() as client:
        tei = client.post("/embed_sparse", json={"inputs": TEXTS}).json()
        ours = client.post(
            "/embed",
            json={
                "model": "splade",
                "batch_id": "b",
                "chunks": [{"chunk_id": str(i), "content": t} for i, t in enumerate(TEXTS)],
            },
        ).json()
        top = client.post(
            "/embed",
            json={
                "model": "splade",
                "batch_id": "b",
                "top_k": 5,
                "chunks": [{"chunk_id": "a", "content": TEXTS[0]}],
            },
        ).json()
    for got, want, chunk in zip(tei, expected, ours["vectors"], strict=True):
        indices = [item["index"] for item in got]
        assert indices == sorted(indices) == list(np.flatnonzero(want))
        np.testing.assert_allclose([item["value"] for item in got], want[indices], atol=1e-5)
        assert chunk["indices"] == indices
        np.testing.assert_allclose(chunk["values"], want[indices], atol=1e-5)
    largest = np.sort(np.argsort(-expected[0])[:5])
    assert top["vectors"][0]["indices"] == largest.tolist()


def test_sparse_rerank_scores_by_dot_product_and_dense_routes_refuse(server: ServerThread, models) -> None:
    expected = sparse_reference(models["splade"], TEXTS)
    with server.client() as client:
        ranked = client.post(
            "/rerank", json={"model": "splade", "query": TEXTS[0], "documents": TEXTS[1:]}
        ).json()
        dense = client.post("/v1/embeddings", json={"model": "splade", "input": "x"})
    scores = {r["index"]: r["score"] for r in ranked["results"]}
    np.testing.assert_allclose([scores[0], scores[1]], expected[1:] @ expected[0], rtol=1e-5)
    assert dense.status_code == 400 and "/embed_sparse" in dense.json()["error"]["message"]


def test_onnx_runtime_serves_classifiers_and_sparse_models_exactly(
    models: dict[str, Path], onnx_cache: Path
) -> None:
    """BACKEND=onnx exports them as it exports the others: equal to the in-process libraries."""
    from reranker.backends.factory import create_backend

    def onnx(name: str):
        settings = make_settings(
            local_model_path=str(models[name]), backend="onnx", onnx_cache_dir=str(onnx_cache)
        )
        return create_backend(settings)

    labels = onnx("sentiment")
    assert (labels.info().backend, labels.info().kind.value, labels.info().labels) == (
        "onnx",
        "classifier",
        SENTIMENT,
    )
    logits = labels.forward(labels.tokenize_pairs([PAIR]) + labels.tokenize_texts(TEXTS))
    np.testing.assert_allclose(logits, classifier_logits(models["sentiment"], [PAIR, *TEXTS]), atol=1e-5)
    weights = onnx("splade")
    got = weights.forward(weights.tokenize_texts(TEXTS))
    want = sparse_reference(models["splade"], TEXTS)
    # ONNX Runtime's kernels sum in another order than torch's over a 30,522-word vocabulary head: the
    # weights agree to about 1e-5 of their scale (measured 1.1e-5 here; bound 1e-4, any CPU); a weight
    # that is clearly there is there in both.
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    clearly = (got > 1e-3 * scale) | (want > 1e-3 * scale)
    assert np.all((got > 0)[clearly]) and np.all((want > 0)[clearly])


def test_mlx_refuses_the_new_kinds_naming_torch(models: dict[str, Path]) -> None:
    from reranker.backends.factory import create_backend

    for name in ("sentiment", "splade"):
        with pytest.raises(StartupError, match="BACKEND=torch"):
            create_backend(make_settings(local_model_path=str(models[name]), backend="mlx"))


def test_model_task_rerank_refuses_a_classifier_and_classify_needs_one(models, embedded_path) -> None:
    from reranker.backends.factory import create_backend, preflight

    with pytest.raises(StartupError, match="3 labels: a classifier"):
        create_backend(make_settings(local_model_path=str(models["sentiment"]), model_task="rerank"))
    with pytest.raises(StartupError, match=r"MODEL_TASK=classify: model .* is a bi-encoder"):
        preflight(make_settings(local_model_path=str(embedded_path), model_task="classify"))


def test_an_inference_free_sparse_model_weights_queries_by_its_table(models, tmp_path: Path) -> None:
    """Queries through the static token-weight table (no model run), documents through the model:
    equal to SparseEncoder.encode_query / encode_document; rerank by their dot product."""
    import json

    from sentence_transformers import SparseEncoder

    from reranker.backends.factory import preflight
    from tests.kind_models import inference_free_splade

    path = inference_free_splade(tmp_path / "inference-free", models["splade"])
    reference = SparseEncoder(str(path), device="cpu")
    queries = reference.encode_query(TEXTS[:1], convert_to_tensor=True).to_dense().numpy()
    documents = reference.encode_document(TEXTS[1:], convert_to_tensor=True).to_dense().numpy()
    with (
        ServerThread(create_app(make_settings(local_model_path=str(path)))) as server,
        server.client() as client,
    ):
        query = client.post("/embed_sparse", json={"inputs": TEXTS[0], "prompt_name": "query"}).json()[0]
        docs = client.post("/embed_sparse", json={"inputs": TEXTS[1:]}).json()
        ranked = client.post("/rerank", json={"query": TEXTS[0], "documents": TEXTS[1:]}).json()["results"]
        details = client.get("/health").json()["model"]["details"]
    assert [item["index"] for item in query] == np.flatnonzero(queries[0]).tolist()
    np.testing.assert_allclose(
        [item["value"] for item in query], queries[0][np.flatnonzero(queries[0])], atol=1e-6
    )
    for got, want in zip(docs, documents, strict=True):
        assert [item["index"] for item in got] == np.flatnonzero(want).tolist()
        np.testing.assert_allclose([item["value"] for item in got], want[np.flatnonzero(want)], atol=1e-5)
    scores = {r["index"]: r["score"] for r in ranked}
    np.testing.assert_allclose([scores[0], scores[1]], documents @ queries[0], rtol=1e-5)
    assert "inference_free" in details
    with (
        ServerThread(create_app(make_settings(local_model_path=str(path)))) as server,
        server.client() as client,
    ):
        chunk = [{"chunk_id": "q", "content": TEXTS[0]}]
        job = client.post(
            "/runsync", json={"input": {"batch_id": "b", "chunks": chunk, "input_type": "query"}}
        ).json()
    assert (
        job["output"]["vectors"][0]["indices"] == np.flatnonzero(queries[0]).tolist()
    )  # the table, as a job too
    # Any other routing is refused by name, never run with a route skipped.
    config = json.loads((path / "router_config.json").read_text())
    config["structure"]["query"] = config["structure"]["document"]
    (path / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(StartupError, match="routes its inputs through a Router"):
        preflight(make_settings(local_model_path=str(path)))


def test_embed_all_equals_sentence_transformers_token_embeddings(
    server: ServerThread, sentence_transformer
) -> None:
    expected = sentence_transformer.encode(TEXTS, output_value="token_embeddings")
    with server.client() as client:
        answer = client.post("/embed_all", json={"inputs": TEXTS})
        single = client.post("/models/embed/embed_all", json={"inputs": TEXTS[1]}).json()
        on_splade = client.post("/models/splade/embed_all", json={"inputs": "x"})
    assert answer.status_code == 200
    for got, want in zip(answer.json(), expected, strict=True):
        np.testing.assert_allclose(np.array(got), want.numpy(), atol=1e-5)
    assert len(single) == 1 and len(single[0]) == len(expected[1])
    assert on_splade.status_code == 400


def test_jobs_and_runpod_serve_the_new_kinds(server: ServerThread, models) -> None:
    """A classify job and a sparse embed job (/v1/jobs and RunPod's /runsync) equal the routes."""
    with server.client() as client:
        classify = {"type": "classify", "input": {"model": "sentiment", "inputs": [TEXTS[0], list(PAIR)]}}
        url = client.post("/v1/jobs", json=classify).json()["status_url"]
        server.wait_until(lambda: client.get(url).json()["status"] == "COMPLETED", "the classify job")
        predictions = client.get(url).json()["output"]["predictions"]
        direct = client.post("/models/sentiment/predict", json={"inputs": [[TEXTS[0]], list(PAIR)]}).json()
        chunks = [{"chunk_id": str(i), "content": text} for i, text in enumerate(TEXTS)]
        sparse_job = {"model": "splade", "batch_id": "b", "chunks": chunks, "top_k": 4}
        ran = client.post("/runsync", json={"input": sparse_job}).json()
        direct_sparse = client.post("/embed", json=sparse_job).json()
        wrong = client.post("/v1/jobs", json={"type": "embed", "input": sparse_job})
    assert predictions == direct
    assert ran["status"] == "COMPLETED"
    assert ran["output"]["vectors"] == direct_sparse["vectors"]
    assert wrong.status_code == 400 and '"type": "embed_sparse"' in wrong.json()["error"]["message"]


def test_tei_info_describes_each_kind(server: ServerThread) -> None:
    with server.client() as client:
        sentiment = client.get("/models/sentiment/info").json()["model_type"]
        sparse = client.get("/models/splade/info").json()["model_type"]
        embed = client.get("/models/embed/info").json()["model_type"]
    assert sentiment == {
        "classifier": {
            "id2label": dict(enumerate(SENTIMENT)) | {},
            "label2id": {v: i for i, v in enumerate(SENTIMENT)},
        }
    } or sentiment["classifier"]["id2label"] == {str(i): v for i, v in enumerate(SENTIMENT)}
    assert sparse == {"embedding": {"pooling": "splade"}}
    assert "embedding" in embed


def test_predict_refuses_empty_texts(server: ServerThread) -> None:
    with server.client() as client:
        single = client.post("/predict", json={"inputs": " "})
        in_batch = client.post("/predict", json={"inputs": [["a"], ["b", " "]]})
    assert single.status_code == 422 and "empty" in single.json()["error"]
    assert in_batch.status_code == 422 and "inputs.1" in in_batch.json()["error"]


def test_embed_without_a_model_prefers_a_dense_bi_encoder_to_a_sparse_model(server: ServerThread) -> None:
    """The server lists splade before embed: /embed and RunPod without a model go to embed."""
    chunks = [{"chunk_id": "a", "content": TEXTS[0]}]
    with server.client() as client:
        ours = client.post("/embed", json={"batch_id": "b", "chunks": chunks}).json()
        ran = client.post("/runsync", json={"input": {"batch_id": "b", "chunks": chunks}}).json()
    assert ours["model"] == "embed" and "vector" in ours["vectors"][0]
    assert ran["status"] == "COMPLETED" and ran["output"]["model"] == "embed"


def test_classify_jobs_check_long_inputs_at_submission_and_cut_huge_texts(server: ServerThread) -> None:
    long = "word " * 2000
    with server.client() as client:
        refused = client.post(
            "/v1/jobs",
            json={
                "type": "classify",
                "input": {"model": "sentiment", "inputs": ["a", long], "truncate": False},
            },
        )
        huge = client.post("/models/sentiment/predict", json={"inputs": "word " * 100_000})
        huge_refused = client.post(
            "/models/sentiment/predict", json={"inputs": "word " * 100_000, "truncate": False}
        )
    assert refused.status_code == 422 and "input.inputs.1" in refused.json()["error"]["message"]
    assert huge.status_code == 200  # cut at MAX_TEXT_CHARS before tokenizing, then truncated
    assert huge_refused.status_code == 422 and "MAX_TEXT_CHARS" in huge_refused.json()["error"]
