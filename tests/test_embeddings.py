"""/embed and /v1/embeddings on the real embedded model, against in-process sentence-transformers."""

from __future__ import annotations

import base64
import concurrent.futures
import time

import numpy as np
import openai
import pytest

from tests.server import ServerThread

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "short",
    "token " * 400,  # longer than the 256-token window: truncated
]


def chunks(texts: list[str], prefix: str = "c") -> list[dict[str, str]]:
    return [{"chunk_id": f"{prefix}{i}", "content": t} for i, t in enumerate(texts)]


def unnormalized_oracle(model, texts: list[str]) -> np.ndarray:
    """Mean of the token embeddings (the model's pooling), before its Normalize module."""
    token_embeddings = model.encode(texts, output_value="token_embeddings", convert_to_numpy=False)
    return np.stack([t.float().mean(dim=0).cpu().numpy() for t in token_embeddings])


def test_embed_equals_sentence_transformers_normalised_and_not(
    embedded_server: ServerThread, sentence_transformer
) -> None:
    with embedded_server.client() as client:
        normalised = client.post("/embed", json={"batch_id": "b1", "chunks": chunks(TEXTS)}).json()
        raw = client.post(
            "/embed", json={"batch_id": "b2", "chunks": chunks(TEXTS), "normalize": False}
        ).json()
    assert normalised["batch_id"] == "b1" and normalised["dimension"] == 384
    assert [v["chunk_id"] for v in normalised["vectors"]] == [f"c{i}" for i in range(len(TEXTS))]
    assert normalised["usage"]["truncated_chunks"] == 1
    expected = sentence_transformer.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(np.array([v["vector"] for v in normalised["vectors"]]), expected, atol=1e-5)
    np.testing.assert_allclose(
        np.array([v["vector"] for v in raw["vectors"]]),
        unnormalized_oracle(sentence_transformer, TEXTS),
        atol=1e-5,
    )


def test_order_is_preserved_under_concurrency(embedded_server: ServerThread, sentence_transformer) -> None:
    rng = np.random.default_rng(3)
    words = " ".join(TEXTS[:2]).split()
    batches = [[" ".join(rng.choice(words, int(n))) for n in rng.integers(2, 60, 12)] for _ in range(8)]
    with embedded_server.client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(client.post, "/embed", json={"batch_id": str(i), "chunks": chunks(b, f"r{i}-")})
            for i, b in enumerate(batches)
        ]
        responses = [f.result().json() for f in futures]
    for i, (texts, body) in enumerate(zip(batches, responses, strict=True)):
        assert [v["chunk_id"] for v in body["vectors"]] == [f"r{i}-{j}" for j in range(len(texts))]
        got = np.array([v["vector"] for v in body["vectors"]])
        np.testing.assert_allclose(got, sentence_transformer.encode(texts), atol=1e-5)


def test_openai_sdk_float_and_base64(embedded_server: ServerThread, sentence_transformer) -> None:
    client = openai.OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused")
    expected = sentence_transformer.encode(TEXTS[:3])
    as_float = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:3], encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in as_float.data]), expected, atol=1e-5)
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert as_float.usage.prompt_tokens > 0
    as_base64 = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:3])  # the SDK's default
    np.testing.assert_allclose(np.array([d.embedding for d in as_base64.data]), expected, atol=1e-5)
    single = client.embeddings.create(model="m", input="short", dimensions=64, encoding_format="float")
    vector = np.array(single.data[0].embedding)
    assert vector.shape == (64,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    truncated = expected[2, :64] / np.linalg.norm(expected[2, :64])
    np.testing.assert_allclose(vector, truncated, atol=1e-5)


def test_openai_sdk_token_id_input_is_a_422_saying_what_to_send(embedded_server: ServerThread) -> None:
    """Issue 22: token ids (what langchain-openai sends by default, counted with tiktoken) were a
    422 that did not say why. They cannot be accepted (they are not this model's ids): the 422
    says so and what to change."""
    client = openai.OpenAI(base_url=f"{embedded_server.url}/v1", api_key="unused", max_retries=0)
    for token_ids in ([[9906, 1917], [15339]], [9906, 1917]):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.embeddings.create(model="all-MiniLM-L6-v2", input=token_ids)
        error = refused.value.body  # the SDK keeps the body's "error" object
        assert isinstance(error, dict), error
        assert error["type"] == "invalid_request", error
        assert "token ids are not supported" in error["message"], error
        assert "check_embedding_ctx_length=False" in error["message"], error


def test_base64_is_little_endian_float32(embedded_server: ServerThread, sentence_transformer) -> None:
    with embedded_server.client() as client:
        body = client.post("/v1/embeddings", json={"input": "short", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, sentence_transformer.encode(["short"])[0], atol=1e-5)


@pytest.mark.usefixtures("slow_backend_skip")
def test_two_thousand_chunks_return_two_thousand_vectors(
    embedded_server: ServerThread, sentence_transformer
) -> None:
    texts = [f"chunk number {i} about topic {i % 17} with some words" for i in range(2000)]
    with embedded_server.client() as client:
        body = client.post("/embed", json={"batch_id": "big", "chunks": chunks(texts)}).json()
    assert len(body["vectors"]) == 2000
    assert [v["chunk_id"] for v in body["vectors"]] == [f"c{i}" for i in range(2000)]
    sample = [0, 999, 1999]
    got = np.array([body["vectors"][i]["vector"] for i in sample])
    np.testing.assert_allclose(got, sentence_transformer.encode([texts[i] for i in sample]), atol=1e-5)


@pytest.mark.usefixtures("slow_backend_skip")
def test_small_request_is_not_starved_by_a_big_one(embedded_server: ServerThread) -> None:
    big = [f"a long ingestion chunk {i} " + "filler words " * 10 for i in range(1500)]
    with embedded_server.client() as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        big_future = pool.submit(client.post, "/embed", json={"batch_id": "big", "chunks": chunks(big)})
        embedded_server.wait_until(
            lambda: embedded_server.runtime.controller.in_flight == 1, "big started", 30
        )
        started = time.perf_counter()
        small = client.post("/embed", json={"batch_id": "small", "chunks": chunks(["one small text"])})
        small_ms = (time.perf_counter() - started) * 1000
        assert small.status_code == 200
        assert not big_future.done(), "the small request had to wait for the big one"
        assert big_future.result().status_code == 200
    print(f"1-text request while a 1,500-chunk request runs: {small_ms:.0f} ms")


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        ({"chunks": [{"chunk_id": "a", "content": "x"}]}, 422, ["batch_id"]),
        ({"batch_id": "b", "chunks": []}, 422, ["chunks"]),
        ({"batch_id": "b", "chunks": [{"chunk_id": "a"}]}, 422, ["chunks.0.content"]),
        ({"batch_id": "b", "chunks": [{"content": "x"}]}, 422, ["chunks.0.chunk_id"]),
        ({"batch_id": "b", "chunks": [{"chunk_id": "a", "content": "  "}]}, 422, ["chunk_id 'a'", "empty"]),
        (
            {
                "batch_id": "b",
                "chunks": [{"chunk_id": "a", "content": "x"}, {"chunk_id": "a", "content": "y"}],
            },
            422,
            ["chunks.1", "duplicate chunk_id"],
        ),
        (
            {"batch_id": "b", "chunks": [{"chunk_id": "long", "content": "word " * 400}], "truncate": False},
            422,
            ["chunk_id 'long'", "256 tokens"],
        ),
        (
            {"batch_id": "b", "chunks": [{"chunk_id": "big", "content": "x" * 20_001}], "truncate": False},
            422,
            ["chunk_id 'big'", "MAX_TEXT_CHARS=20000", "truncate is false"],
        ),
    ],
)
def test_embed_bad_input(embedded_server: ServerThread, body: dict, status: int, needles: list[str]) -> None:
    with embedded_server.client() as client:
        response = client.post("/embed", json=body)
    assert response.status_code == status, response.text
    for needle in needles:
        assert needle in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"input": []}, ["input"]),
        ({"input": ["ok", ""]}, ["input", "input 1 is empty"]),
        ({"input": [[1, 2, 3]]}, ["input: token ids are not supported", "check_embedding_ctx_length=False"]),
        ({"input": [101, 7592]}, ["input: token ids are not supported", "list of strings"]),
        ({"input": "x", "encoding_format": "int8"}, ["encoding_format"]),
        ({"input": "x", "dimensions": 1000}, ["dimensions", "384"]),
        ({"input": "x", "dimensions": 0}, ["dimensions"]),
    ],
)
def test_openai_bad_input(embedded_server: ServerThread, body: dict, needles: list[str]) -> None:
    with embedded_server.client() as client:
        response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 422, response.text
    for needle in needles:
        assert needle in response.json()["error"]["message"]
