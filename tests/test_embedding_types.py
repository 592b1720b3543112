"""Compact embedding types (engine/quantize.py) and Cohere's /v2/embed and /v1/embed, on the real
embedded model, against sentence-transformers' encode and quantize_embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cohere
import numpy as np
import pytest
from sentence_transformers import quantize_embeddings

from reranker.api.app import create_app
from reranker.engine.quantize import PROBE_TEXTS, calibration_texts, calibration_view, quantize
from reranker.errors import StartupError
from tests.conftest import make_settings
from tests.server import ServerThread

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "short",
    "How do I renew my passport before travelling abroad?",
]
TYPES = ["float", "int8", "uint8", "binary", "ubinary"]
LONG = "token " * 400  # over the 256-token window


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(create_app(make_settings())) as running:
        yield running


@pytest.fixture(scope="module")
def calibrated_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, list[str]]]:
    texts = [
        f"Invoice {i}: {n} units of part {i * 7} shipped to warehouse {i % 3}."
        for i, n in enumerate(range(40))
    ]
    path = Path(tmp_path_factory.mktemp("calibration")) / "texts.txt"
    path.write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    with ServerThread(create_app(make_settings(embedding_calibration_file=str(path)))) as running:
        yield running, texts


# --- quantize.py against sentence-transformers' quantize_embeddings -------------------------------


@pytest.mark.parametrize("dim", [384, 13])  # 13: the last byte zero-padded
def test_packed_bits_equal_sentence_transformers(dim: int) -> None:
    rng = np.random.default_rng(dim)
    vectors = rng.standard_normal((50, dim)).astype(np.float32)
    vectors[0, :5] = 0.0  # zero is not positive: bit 0
    for kind in ("binary", "ubinary"):
        ours, theirs = quantize(vectors, kind), quantize_embeddings(vectors, precision=kind)
        assert ours.dtype == theirs.dtype and ours.shape == (50, (dim + 7) // 8)
        np.testing.assert_array_equal(ours, theirs)


def test_int8_uint8_equal_sentence_transformers_given_the_same_calibration() -> None:
    rng = np.random.default_rng(7)
    calibration = rng.standard_normal((200, 64)).astype(np.float32)
    calibration[:, 3] = 0.25  # a constant dimension: step 1
    vectors = rng.standard_normal((30, 64)).astype(np.float32) * 1.5  # some outside the ranges: clipped
    ranges = np.vstack((calibration.min(axis=0), calibration.max(axis=0)))
    for kind in ("int8", "uint8"):
        ours = quantize(vectors, kind, ranges)
        theirs = quantize_embeddings(vectors, precision=kind, calibration_embeddings=calibration)
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_calibration_texts_come_from_the_file_else_the_probe_texts(tmp_path: Path) -> None:
    assert calibration_texts(None) == (list(PROBE_TEXTS), "probe") and len(PROBE_TEXTS) >= 100
    good = tmp_path / "good.txt"
    good.write_text("first text\n\n  \nsecond text\n", encoding="utf-8")
    assert calibration_texts(str(good)) == (["first text", "second text"], "file")
    (tmp_path / "one.txt").write_text("only one\n", encoding="utf-8")
    for name, problem in (("missing.txt", "cannot be read"), ("one.txt", "1 non-empty lines")):
        with pytest.raises(StartupError, match=f"EMBEDDING_CALIBRATION_FILE=.*{name}: {problem}"):
            calibration_texts(str(tmp_path / name))


# --- the real cohere SDK against the server ---------------------------------------------------


def test_cohere_v2_embed_every_type_equals_sentence_transformers(server, sentence_transformer) -> None:
    client = cohere.ClientV2(base_url=server.url, api_key="x")
    response = client.embed(
        model="all-MiniLM-L6-v2", texts=TEXTS, input_type="search_document", embedding_types=TYPES
    )
    floats = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = response.embeddings
    np.testing.assert_allclose(np.array(got.float_), floats, atol=1e-5)
    served = np.array(got.float_, dtype=np.float32)
    for kind in ("binary", "ubinary"):
        np.testing.assert_array_equal(
            np.array(getattr(got, kind)), quantize_embeddings(served, precision=kind)
        )
    # int8/uint8: sentence-transformers' formula with the probe texts as calibration embeddings
    probe = sentence_transformer.encode(list(PROBE_TEXTS), normalize_embeddings=True, convert_to_numpy=True)
    for kind in ("int8", "uint8"):
        expected = quantize_embeddings(served, precision=kind, calibration_embeddings=probe)
        codes = np.array(getattr(got, kind))
        assert (
            np.abs(codes - expected.astype(int)).max() <= 1
        )  # the float oracle's last bits may move a code by one
        assert (codes == expected).mean() > 0.99
    assert response.texts == TEXTS and response.response_type == "embeddings_by_type"
    assert response.meta.api_version.version == "2" and response.meta.billed_units.input_tokens > len(TEXTS)
    assert len(got.binary[0]) == 384 // 8 and got.base64 is None


def test_cohere_v1_embed_floats_and_by_type(server, sentence_transformer) -> None:
    client = cohere.Client(base_url=server.url, api_key="x")
    plain = client.embed(texts=TEXTS, model="m", input_type="search_query")
    floats = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert plain.response_type == "embeddings_floats"
    np.testing.assert_allclose(np.array(plain.embeddings), floats, atol=1e-5)
    by_type = client.embed(texts=TEXTS, input_type="search_query", embedding_types=["ubinary", "int8"])
    assert by_type.response_type == "embeddings_by_type" and by_type.embeddings.float_ is None
    assert by_type.meta.api_version.version == "1"
    np.testing.assert_array_equal(
        np.array(by_type.embeddings.ubinary),
        quantize_embeddings(np.array(plain.embeddings), precision="ubinary"),
    )


def test_the_same_text_gets_the_same_codes_whatever_else_is_in_the_request(server) -> None:
    client = cohere.ClientV2(base_url=server.url, api_key="x")

    def codes(texts: list[str]) -> dict[str, list[int]]:
        got = client.embed(
            model="m", texts=texts, input_type="search_document", embedding_types=["int8", "uint8"]
        ).embeddings
        return {"int8": got.int8[texts.index(TEXTS[0])], "uint8": got.uint8[texts.index(TEXTS[0])]}

    alone = codes([TEXTS[0]])
    assert len(set(alone["int8"])) > 50  # real codes, not a single text's min = max
    assert codes(["first", *TEXTS[1:], TEXTS[0], "zzz " * 30]) == alone


def test_output_dimension_cuts_renormalises_and_refuses_more(server, sentence_transformer) -> None:
    client = cohere.ClientV2(base_url=server.url, api_key="x")
    got = client.embed(
        model="m",
        texts=TEXTS,
        input_type="search_document",
        embedding_types=["float", "int8"],
        output_dimension=64,
    ).embeddings
    full = sentence_transformer.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    cut = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(got.float_), cut, atol=1e-5)
    assert len(got.int8[0]) == 64 and len(set(got.int8[0])) > 20
    with pytest.raises(
        cohere.UnprocessableEntityError, match="output_dimension: 385 is larger than the model's 384"
    ):
        client.embed(model="m", texts=TEXTS, input_type="search_document", output_dimension=385)


def test_embed_route_gives_the_same_codes_as_cohere(server) -> None:
    client = cohere.ClientV2(base_url=server.url, api_key="x")
    cohere_codes = client.embed(
        model="m", texts=TEXTS, input_type="search_document", embedding_types=TYPES[1:]
    ).embeddings
    chunks = [{"chunk_id": f"c{i}", "content": text} for i, text in enumerate(TEXTS)]
    with server.client() as http:
        for kind in TYPES[1:]:
            body = {
                "batch_id": "b",
                "chunks": chunks,
                "input_type": "search_document",
                "embedding_type": kind,
            }
            answer = http.post("/embed", json=body)
            assert answer.status_code == 200, answer.text
            assert [v["vector"] for v in answer.json()["vectors"]] == getattr(cohere_codes, kind)
        refused = http.post(
            "/embed", json={"batch_id": "b", "chunks": chunks, "embedding_type": "int8", "normalize": False}
        )
        assert refused.status_code == 422 and "normalised" in refused.text
        job = http.post(
            "/v1/jobs",
            json={"type": "embed", "input": {"batch_id": "b", "chunks": chunks, "embedding_type": "binary"}},
        )
        assert job.status_code == 422 and "embedding_type" in job.text


def test_refusals_name_what_is_wrong(server) -> None:
    client = cohere.ClientV2(base_url=server.url, api_key="x")
    with pytest.raises(cohere.UnprocessableEntityError, match="only text is supported"):
        client.embed(model="m", images=["data:image/png;base64,iVBORw0KGgo="], input_type="image")
    with pytest.raises(cohere.UnprocessableEntityError, match="only text is supported"):
        client.embed(
            model="m",
            input_type="search_document",
            inputs=[{"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        )
    with pytest.raises(cohere.UnprocessableEntityError, match=r"texts\.1: longer than the model.s 256"):
        client.embed(model="m", texts=["fine", LONG], input_type="search_document", truncate="NONE")
    with server.client() as http:
        unknown = http.post(
            "/v2/embed",
            json={"model": "m", "texts": ["a"], "input_type": "search_document", "embedding_types": ["int4"]},
        )
    assert unknown.status_code == 422 and "embedding_types.0" in unknown.text
    cut = client.embed(model="m", texts=[LONG], input_type="search_document")  # END: cut at the window
    assert cut.meta.warnings and "cut at the model's 256 tokens" in cut.meta.warnings[0]


def test_calibration_file_sets_the_ranges_and_says_so(
    server, calibrated_server, sentence_transformer
) -> None:
    calibrated, texts = calibrated_server
    model = calibrated.runtime.default
    assert calibration_view(model) == {
        "source": "file",
        "file": model.settings.embedding_calibration_file,
        "texts": None,
        "computed": False,
    }
    ours = (
        cohere.ClientV2(base_url=calibrated.url, api_key="x")
        .embed(model="m", texts=TEXTS, input_type="search_document", embedding_types=["float", "uint8"])
        .embeddings
    )
    assert calibration_view(model)["computed"] and calibration_view(model)["texts"] == len(texts)
    calibration = sentence_transformer.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    expected = quantize_embeddings(
        np.array(ours.float_, dtype=np.float32), precision="uint8", calibration_embeddings=calibration
    )
    codes = np.array(ours.uint8)
    assert np.abs(codes - expected.astype(int)).max() <= 1 and (codes == expected).mean() > 0.99
    probe_codes = (
        cohere.ClientV2(base_url=server.url, api_key="x")
        .embed(model="m", texts=TEXTS, input_type="search_document", embedding_types=["uint8"])
        .embeddings.uint8
    )
    assert probe_codes != ours.uint8
    assert calibration_view(server.runtime.default)["source"] == "probe"


def test_a_sparse_model_refuses_embedding_types(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.kind_models import splade

    path = splade(tmp_path_factory.mktemp("splade") / "splade")
    chunks = [{"chunk_id": "c0", "content": "rain"}]
    with ServerThread(create_app(make_settings(models=f"splade={path}"))) as sparse, sparse.client() as http:
        codes = http.post("/embed", json={"batch_id": "b", "chunks": chunks, "embedding_type": "binary"})
        cohere_route = http.post(
            "/v2/embed", json={"model": "splade", "texts": ["rain"], "input_type": "search_query"}
        )
    assert codes.status_code == 422 and "sparse model answers indices and values" in codes.text
    assert cohere_route.status_code == 400 and "/embed_sparse" in cohere_route.text


STORY = (
    "the river runs past an old mill where farmers once brought their grain every autumn and "
    "children watched the wheel turn slowly while the water sang over stones worn smooth by time"
)
WORDS = tuple(STORY.split())


def test_truncate_start_keeps_a_long_texts_end_whole_words(server, sentence_transformer) -> None:
    """Cohere's truncate START (TEI's truncation_direction left): the text loses its beginning, cut
    at the first word that leaves the rest within the window; what remains is embedded as it is."""
    words = [f"{WORDS[i % len(WORDS)]}{'' if i < 300 else 's'}" for i in range(320)]  # the end differs
    text = " ".join(words)
    tokenizer = sentence_transformer.tokenizer
    kept = next(
        " ".join(words[start:])
        for start in range(len(words))
        if len(tokenizer(" ".join(words[start:]))["input_ids"]) <= 256
    )
    want = sentence_transformer.encode([kept], normalize_embeddings=True)[0]
    client = cohere.ClientV2(base_url=server.url, api_key="x")
    start = client.embed(model="m", texts=[text, "short"], input_type="search_document", truncate="START")
    np.testing.assert_allclose(start.embeddings.float_[0], want, atol=1e-5)
    short = sentence_transformer.encode(["short"], normalize_embeddings=True)[0]
    np.testing.assert_allclose(start.embeddings.float_[1], short, atol=1e-5)  # a short text is whole
    assert start.meta.warnings and start.meta.warnings[0].startswith("1 of the texts were cut")
    end = client.embed(model="m", texts=[text], input_type="search_document", truncate="END")
    assert not np.allclose(end.embeddings.float_[0], want, atol=1e-3)  # END keeps the other end
    with server.client() as http:
        tei = http.post("/embed", json={"inputs": text, "truncation_direction": "Left"})
        sideways = http.post("/embed", json={"inputs": text, "truncation_direction": "sideways"})
    assert tei.status_code == 200, tei.text
    np.testing.assert_allclose(tei.json()[0], want, atol=1e-5)
    assert sideways.status_code == 422 and "truncation_direction" in sideways.text


def test_base64_is_the_float_vectors_bytes(server) -> None:
    import base64

    client = cohere.ClientV2(base_url=server.url, api_key="x")
    response = client.embed(
        model="m", texts=TEXTS, input_type="search_query", embedding_types=["float", "base64"]
    )
    decoded = [np.frombuffer(base64.b64decode(item), dtype="<f4") for item in response.embeddings.base64]
    np.testing.assert_array_equal(np.array(decoded), np.array(response.embeddings.float_, dtype=np.float32))
