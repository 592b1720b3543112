"""Every model family on every backend: a tiny random-weight model per family (tests/families.py),
served by torch and ONNX fp32 (and MLX where it is installed), compared with in-process
sentence-transformers - or, for the Qwen3-Reranker-style causal LM, with the transformers
computation of its documented formula - to 1e-4. A backend that cannot serve a family refuses
at start-up with a StartupError naming the family and a backend that can.

In-process backend objects cover the matrix (a server per cell would be slow); one HTTP server
per family on torch covers the served path, and the XLM-R cross-encoder's long documents are
checked over HTTP on torch and ONNX (the 500 of issue 16).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.factory import create_backend
from reranker.backends.templates import QWEN3_RERANKER
from reranker.errors import StartupError
from tests.conftest import backend_param, make_settings
from tests.families import (
    BI_ENCODER,
    DOCUMENTS,
    FAMILIES,
    QUERY,
    TABLE,
    TEXTS,
    TOLERANCE,
    expected,
    family_kind,
    qwen3_reranker_scores,
    reference_output,
    reference_scores,
    served_output,
    tolerance,
)
from tests.server import ServerThread
from tests.test_jobs import follow

BACKENDS = [backend_param(name) for name in ("torch", "onnx", "mlx")]
LONG_DOCUMENT = "the weather is cold and the wind is warm today " * 120 + "berlin has 3 million people"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", TABLE)
def test_each_family_is_served_exactly_on_every_backend(
    name: str, backend_name: str, family_model: Callable[[str], Path], onnx_cache: Path
) -> None:
    """Every cell of the family table in docs/MODELS.md: exact, or refused at start-up naming the
    backend that serves it (the table is tests/families.py's; test_multi_backend.py --families
    writes it from a run)."""
    path = family_model(name)
    settings = make_settings(
        local_model_path=str(path), backend=backend_name, onnx_quantize="none", onnx_cache_dir=str(onnx_cache)
    )
    if expected(name, backend_name) == "refused":
        with pytest.raises(StartupError, match="BACKEND=torch"):
            create_backend(settings)
        return
    backend = create_backend(settings)
    got, want = served_output(backend, name), reference_output(path, name)
    assert got.shape == want.shape
    bound = tolerance(name, want)
    np.testing.assert_allclose(got, want, atol=bound, rtol=0)
    assert float(np.ptp(want)) > 100 * bound, "the oracle must tell inputs apart"


# --- over HTTP ---------------------------------------------------------------------------


def _serve(path: Path, **values: object) -> ServerThread:
    server = ServerThread(create_app(make_settings(local_model_path=str(path), **values))).start()
    assert server.runtime.status.value == "healthy", server.runtime.error
    return server


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_over_http_equals_its_library(name: str, family_model: Callable[[str], Path]) -> None:
    path = family_model(name)
    server = _serve(path)
    try:
        with server.client() as client:
            ranked = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
            raw = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "raw_scores": True})
            health = client.get("/health").json()["model"]
            embedded = (
                client.post("/v1/embeddings", json={"input": TEXTS})
                if family_kind(name) == BI_ENCODER
                else None
            )
    finally:
        server.stop()
    assert ranked.status_code == 200, ranked.text
    assert health["family"] == _model_type(path)
    got = np.zeros(len(DOCUMENTS))
    for result in ranked.json()["results"]:
        got[result["index"]] = result["score"]
    raw_got = np.zeros(len(DOCUMENTS))
    for result in raw.json()["results"]:
        raw_got[result["index"]] = result["score"]
    if family_kind(name) == BI_ENCODER:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu")
        query = model.encode_query([QUERY], normalize_embeddings=True)
        documents = model.encode_document(DOCUMENTS, normalize_embeddings=True)
        np.testing.assert_allclose(got, (documents @ query.T)[:, 0], atol=TOLERANCE)
        np.testing.assert_allclose(raw_got, got, atol=1e-7)  # a cosine has no activation
        assert embedded is not None and embedded.status_code == 200
        vectors = np.array([item["embedding"] for item in embedded.json()["data"]])
        np.testing.assert_allclose(vectors, model.encode(TEXTS), atol=TOLERANCE)
    else:
        want = reference_scores(path, name, [(QUERY, doc) for doc in DOCUMENTS])
        np.testing.assert_allclose(got, want, atol=TOLERANCE)
        np.testing.assert_allclose(_sigmoid(raw_got), want, atol=TOLERANCE)  # the logit, before sigmoid
        assert health["activation"] == "sigmoid"


def _model_type(path: Path) -> str:
    import json

    return json.loads((path / "config.json").read_text())["model_type"]


@pytest.mark.parametrize("backend_name", [backend_param("torch"), backend_param("onnx")])
def test_xlm_roberta_cross_encoder_scores_long_documents_over_http(
    backend_name: str, family_model: Callable[[str], Path], onnx_cache: Path
) -> None:
    """Windows past the first carry type id 1 from XLM-R's pair template: a model with one token
    type must get 0 (issue 16's 500). The served score is the best window's, as computed in-process."""
    path = family_model("xlm-roberta-cross")
    settings = {"backend": backend_name, "onnx_quantize": "none", "onnx_cache_dir": str(onnx_cache)}
    server = _serve(path, **settings)
    try:
        with server.client() as client:
            body = {"query": QUERY, "documents": [LONG_DOCUMENT, DOCUMENTS[0]], "return_details": True}
            response = client.post("/v1/rerank", json=body)
        backend = server.runtime.backend
        windows = backend.pair_windows([(QUERY, LONG_DOCUMENT)], overlap=32, max_windows=10)[0]
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    results = {r["index"]: r for r in response.json()["results"]}
    assert results[0]["details"]["windows"] == len(windows.items) > 1
    assert all(set(item.type_ids) == {0} for item in windows.items)
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(path), device="cpu")
    texts = [reference.tokenizer.decode(item.ids, skip_special_tokens=False) for item in windows.items]
    assert texts  # the windows, scored in-process by the model's own library on its own token ids
    import torch

    with torch.no_grad():
        logits = [
            reference.model(
                input_ids=torch.tensor([item.ids]),
                attention_mask=torch.ones(1, len(item.ids), dtype=torch.long),
            )
            .logits[0, 0]
            .item()
            for item in windows.items
        ]
    assert results[0]["relevance_score"] == pytest.approx(float(_sigmoid(max(logits))), abs=TOLERANCE)


def test_causal_reranker_takes_an_instruction(family_model: Callable[[str], Path]) -> None:
    path = family_model("qwen3-reranker")
    instruction = "Judge whether the passage names a city"
    server = _serve(path)
    try:
        with server.client() as client:
            given = client.post(
                "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "instruction": instruction}
            )
            infinity = client.post(
                "/infinity/rerank", json={"query": QUERY, "documents": DOCUMENTS, "instruction": instruction}
            )
            health = client.get("/health").json()["model"]
            job_input = {
                "query": QUERY,
                "documents": DOCUMENTS,
                "instruction": instruction,
                "raw_scores": True,
            }
            submitted = client.post("/v1/jobs", json={"type": "rerank", "input": job_input})
            assert submitted.status_code == 202, submitted.text
            job = follow(client, submitted.json()["job_id"])[-1]
    finally:
        server.stop()
    assert given.status_code == 200, given.text
    got = np.zeros(len(DOCUMENTS))
    for result in given.json()["results"]:
        got[result["index"]] = result["relevance_score"]
    want = qwen3_reranker_scores(path, [(QUERY, doc) for doc in DOCUMENTS], instruction)
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    assert infinity.status_code == 200, infinity.text  # Infinity's route takes it too (issue 22)
    from_infinity = np.zeros(len(DOCUMENTS))
    for result in infinity.json()["results"]:
        from_infinity[result["index"]] = result["relevance_score"]
    np.testing.assert_allclose(from_infinity, want, atol=TOLERANCE)
    # A job takes the instruction and raw_scores too: the logit of the same probability.
    assert job["status"] == "COMPLETED", job
    logits = np.zeros(len(DOCUMENTS))
    for result in job["output"]["results"]:
        logits[result["index"]] = result["relevance_score"]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), want, atol=TOLERANCE)
    default = qwen3_reranker_scores(path, [(QUERY, doc) for doc in DOCUMENTS])
    assert np.abs(np.array(default) - want).max() > 100 * TOLERANCE  # the instruction mattered
    assert health["instruction"] == QWEN3_RERANKER.default_instruction


# --- what the model declares: activation, modules, remote code, max length -----------------


def _copy(path: Path, target: Path) -> Path:
    shutil.copytree(path, target)
    return target


def _edit_json(path: Path, edit: Callable[[object], object]) -> None:
    import json

    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_declared_identity_activation_is_applied(family_model: Callable[[str], Path], tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    path = _copy(family_model("bert-cross"), tmp_path / "identity")
    _edit_json(
        path / "config_sentence_transformers.json",
        lambda c: {**c, "activation_fn": "torch.nn.modules.linear.Identity"},
    )
    want = CrossEncoder(str(path), device="cpu").predict([(QUERY, doc) for doc in DOCUMENTS])
    assert (want < 0).any() or (want > 1).any(), "identity must leave logits outside (0, 1) here"
    server = _serve(path)
    try:
        with server.client() as client:
            response = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    finally:
        server.stop()
    got = np.zeros(len(DOCUMENTS))
    for result in response.json()["results"]:
        got[result["index"]] = result["score"]
    np.testing.assert_allclose(got, want, atol=TOLERANCE)


def test_a_module_the_server_cannot_run_is_refused_by_name(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    path = _copy(family_model("bert-mean"), tmp_path / "layer-norm")
    _edit_json(
        path / "modules.json",
        lambda m: [
            *m,
            {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"},
        ],
    )
    with pytest.raises(StartupError, match=r"sentence_transformers\.models\.LayerNorm"):
        create_backend(make_settings(local_model_path=str(path)))


def test_remote_code_models_need_trust_remote_code(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    from reranker.backends.source import resolve_model_source

    path = _copy(family_model("bert-cross"), tmp_path / "remote")
    _edit_json(path / "config.json", lambda c: {**c, "auto_map": {"AutoModel": "modeling_x.XModel"}})
    with pytest.raises(StartupError, match="TRUST_REMOTE_CODE=true"):
        resolve_model_source(make_settings(local_model_path=str(path)))
    assert resolve_model_source(
        make_settings(local_model_path=str(path), trust_remote_code=True)
    ).layout.needs_remote_code


def test_max_model_length_caps_the_models_own(family_model: Callable[[str], Path]) -> None:
    from sentence_transformers import SentenceTransformer

    path = family_model("modernbert-bi")
    backend = create_backend(make_settings(local_model_path=str(path), max_model_length=12))
    assert backend.info().max_length == 12
    reference = SentenceTransformer(str(path), device="cpu")
    own = reference.max_seq_length
    reference.max_seq_length = 12
    vectors = backend.embed_texts([DOCUMENTS[3]])
    np.testing.assert_allclose(
        vectors / np.linalg.norm(vectors), reference.encode([DOCUMENTS[3]]), atol=TOLERANCE
    )
    uncapped = create_backend(make_settings(local_model_path=str(path)))
    assert uncapped.info().max_length == own > 12


@pytest.mark.parametrize("name", FAMILIES)
def test_long_documents_are_windowed_for_every_family(
    name: str, family_model: Callable[[str], Path], onnx_cache: Path
) -> None:
    """A document several windows long: windows in the family's own tokenizer, type ids 0 where the
    model has one token type, a causal reranker's every window ending in its template's suffix,
    and torch and ONNX fp32 agreeing on every window."""
    path = family_model(name)
    common = {"local_model_path": str(path), "onnx_quantize": "none", "onnx_cache_dir": str(onnx_cache)}
    torch_backend = create_backend(make_settings(**common, max_model_length=64))
    onnx_backend = create_backend(make_settings(**common, backend="onnx", max_model_length=64))
    layout = torch_backend._source.layout  # what the model declared
    if family_kind(name) == BI_ENCODER:
        windows = torch_backend.text_windows([LONG_DOCUMENT], overlap=8, max_windows=50)[0].items
    else:
        query = QWEN3_RERANKER.query_part(QUERY) if layout.causal_lm else QUERY
        windows = torch_backend.pair_windows([(query, LONG_DOCUMENT)], overlap=8, max_windows=50)[0].items
    assert len(windows) > 3 and max(len(w) for w in windows) <= 64
    if not layout.uses_token_types:
        assert all(set(w.type_ids) == {0} for w in windows)
    if layout.pooling == ("lasttoken",):  # the token last-token pooling reads ends every window
        last = torch_backend.tokenize_texts(["x"])[0].ids[-1]
        assert all(w.ids[-1] == last for w in windows)
    if layout.causal_lm:
        suffix = torch_backend.tokenizer.texts([QWEN3_RERANKER.suffix])[0].ids
        assert all(list(w.ids[-len(suffix) :]) == list(suffix) for w in windows)
    got, want = onnx_backend.forward(windows), torch_backend.forward(windows)
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, atol=TOLERANCE * 10)


def test_layout_reads_both_pooling_formats_and_refuses_what_it_cannot_apply(
    family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    from reranker.backends.source import read_layout

    assert read_layout(family_model("bert-cls")).pooling == ("cls",)
    assert read_layout(family_model("bert-cls-old-config")).pooling == ("cls",)
    assert read_layout(family_model("qwen3-last-token")).pooling == ("lasttoken",)
    dense = read_layout(family_model("bert-dense")).dense
    assert [(d.in_features, d.out_features, d.bias, d.activation) for d in dense] == [(32, 24, True, "tanh")]
    path = _copy(family_model("bert-mean"), tmp_path / "two-modes")
    _edit_json(path / "1_Pooling" / "config.json", lambda c: {**c, "pooling_mode": ["cls", "max"]})
    assert read_layout(path).pooling == ("cls", "max")
    _edit_json(path / "1_Pooling" / "config.json", lambda c: {**c, "pooling_mode": "median"})
    with pytest.raises(StartupError, match="median"):
        read_layout(path)
    cross = _copy(family_model("bert-cross"), tmp_path / "custom-activation")
    _edit_json(cross / "config_sentence_transformers.json", lambda c: {**c, "activation_fn": "mylib.Sharpen"})
    with pytest.raises(StartupError, match=r"mylib\.Sharpen"):
        read_layout(cross)


@pytest.mark.parametrize("backend", BACKENDS)
def test_roberta_family_length_stops_at_its_position_table(
    backend: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """XLM-R's 514 positions hold 512 tokens (ids start past the padding id): a model that declares
    no length of its own gets 512, and a document cut there scores instead of indexing past the table."""
    from sentence_transformers import CrossEncoder

    path = _copy(family_model("xlm-roberta-cross"), tmp_path / "undeclared")
    _edit_json(
        path / "tokenizer_config.json", lambda c: {k: v for k, v in c.items() if k != "model_max_length"}
    )
    _edit_json(
        path / "sentence_bert_config.json", lambda c: {k: v for k, v in c.items() if k != "max_seq_length"}
    )
    loaded = create_backend(make_settings(local_model_path=str(path), backend=backend))
    assert loaded.info().max_length == 512
    pairs = [(QUERY, LONG_DOCUMENT * 3)]
    assert len(loaded.tokenize_pairs(pairs)[0]) == 512
    reference = CrossEncoder(str(path), device="cpu", max_length=512).predict(pairs)  # sigmoid of the logit
    np.testing.assert_allclose(_sigmoid(loaded.score_pairs(pairs)), reference, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["bert-mean", "qwen3-last-token", "xlm-roberta-bi"])
def test_cutting_a_texts_beginning_keeps_its_own_last_tokens(
    name: str, family_model: Callable[[str], Path]
) -> None:
    """truncate START / truncation_direction left (InferenceService.keep_ends) on WordPiece,
    byte-level BPE and SentencePiece: a cut text is a suffix of the text that fits the window, and
    cut where a word begins its tokens are the text's last ones; a text without spaces is cut
    too (at a token boundary), never left for the end to be cut instead."""
    from reranker.engine.service import InferenceService

    backend = create_backend(make_settings(local_model_path=str(family_model(name)), max_model_length=32))
    service = InferenceService.__new__(InferenceService)  # keep_ends needs the backend and its facts only
    service._backend, service._info = backend, backend.info()
    english = " ".join(DOCUMENTS * 3)
    unspaced = "berlin,has,many,people,living,in,the,city," * 12
    kept, cut = service.keep_ends([english, unspaced, "short"], "")
    assert cut == 2 and kept[2] == "short"

    def ids(text: str) -> list[int]:
        return [span.id for span in backend.token_spans([text])[0] if not span.special]

    for text, end in zip((english, unspaced), kept[:2], strict=True):
        assert text.endswith(end) and len(end) < len(text)
        assert len(backend.token_spans([end])[0]) <= 32
    assert ids(kept[0]) == ids(english)[-len(ids(kept[0])) :]
