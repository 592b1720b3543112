"""The MLX backend on every model family it serves, against in-process sentence-transformers
(or, for the Qwen3-Reranker-style causal LM, its documented yes/no formula run by
transformers), and the clear start-up refusal of what it cannot serve.

The models are the tiny random-weight ones of tests/families.py (built once per session).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from reranker.backends.base import Backend, Encoded, ModelKind
from reranker.backends.factory import create_backend
from reranker.backends.source import resolve_model_source
from reranker.backends.templates import QWEN3_RERANKER
from reranker.errors import StartupError
from tests.conftest import backend_param, make_settings
from tests.families import BI_ENCODER, CORPUS_WORDS, family_kind, qwen3_reranker_scores

pytestmark = pytest.mark.parametrize("backend", [backend_param("mlx")])

TOLERANCE = 1e-4
QUERY = "how many people live in berlin"
DOCUMENTS = [
    "berlin is the capital of germany and has a large population of about four million people",
    "rain today",
    "yes",
    "hamburg has a large port on the river and many people live there " * 3,
    "what is the weather in paris tomorrow",
]
BI_ENCODERS = ["bert-mean", "bert-cls", "bert-cls-old-config", "bert-dense", "bert-prompts", "xlm-roberta-bi"]
BI_ENCODERS += ["modernbert-bi", "qwen3-last-token"]
CROSS_ENCODERS = ["bert-cross", "distilbert-cross", "roberta-cross", "xlm-roberta-cross", "modernbert-cross"]
CROSS_ENCODERS += ["qwen3-seq-cls"]

_backends: dict[str, Backend] = {}


def mlx_backend(path: Path) -> Backend:
    """One MLX backend per model for the module (loading is the slow part on mlx-cpu)."""
    key = str(path)
    if key not in _backends:
        _backends[key] = create_backend(make_settings(local_model_path=key, backend="mlx"))
    return _backends[key]


def test_the_families_served_are_all_here(backend: str) -> None:
    from tests.families import FAMILIES

    served = set(BI_ENCODERS + CROSS_ENCODERS + ["qwen3-reranker"])
    assert served == set(FAMILIES), "a family of tests/families.py without an MLX check here"


@pytest.mark.parametrize("family", BI_ENCODERS)
def test_bi_encoder_vectors_equal_sentence_transformers(
    backend: str, family: str, family_model: Callable[[str], Path]
) -> None:
    from sentence_transformers import SentenceTransformer

    path = family_model(family)
    assert family_kind(family) == BI_ENCODER
    model = mlx_backend(path)
    reference = SentenceTransformer(str(path), device="cpu", local_files_only=True).encode(
        [QUERY, *DOCUMENTS], convert_to_numpy=True
    )
    items = model.tokenize_texts([QUERY, *DOCUMENTS])
    vectors = model.forward(items)
    info = model.info()
    assert (info.backend, info.kind, info.dimension) == ("mlx", ModelKind.BI_ENCODER, reference.shape[1])
    if info.normalize_embeddings:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=TOLERANCE)
    # alone or beside longer texts (right padding): the same vector
    np.testing.assert_allclose(model.forward(items[2:3]), model.forward(items)[2:3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", CROSS_ENCODERS)
def test_cross_encoder_logits_equal_sentence_transformers(
    backend: str, family: str, family_model: Callable[[str], Path]
) -> None:
    import torch
    from sentence_transformers import CrossEncoder

    path = family_model(family)
    model = mlx_backend(path)
    pairs = [(QUERY, document) for document in DOCUMENTS]
    reference = CrossEncoder(str(path), device="cpu", local_files_only=True).predict(
        pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True
    )
    items = model.tokenize_pairs(pairs)
    logits = model.forward(items)
    assert model.info().kind is ModelKind.CROSS_ENCODER and logits.shape == (len(pairs),)
    np.testing.assert_allclose(logits, reference.reshape(-1), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(model.forward(items[1:2]), logits[1:2], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def qwen2_models(
    family_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Qwen2 (gte-Qwen2, mxbai-rerank-v2 backbones: q/k/v biases, no q/k norm), beside tests/families.py's
    Qwen3: a sequence-classification reranker and a last-token-pooled bi-encoder, on the Qwen tokenizer."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, Qwen2Config

    from tests.families import HEADS, HIDDEN, INIT_RANGE, INTERMEDIATE, LAYERS, SEED

    root = tmp_path_factory.mktemp("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(str(family_model("qwen3-seq-cls")))
    built = {}
    for name, model_class in (("cross", AutoModelForSequenceClassification), ("bi", AutoModel)):
        torch.manual_seed(SEED)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=1,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=INIT_RANGE,
            num_labels=1,
        )
        built[name] = root / f"{name}-hf"
        model_class.from_config(config).eval().save_pretrained(str(built[name]))
        tokenizer.save_pretrained(str(built[name]))
    transformer = Transformer(str(built["bi"]))
    bi = SentenceTransformer(
        modules=[transformer, Pooling(HIDDEN, pooling_mode="lasttoken"), Normalize()], device="cpu"
    )
    bi.save(str(root / "bi"))
    return {"qwen2-seq-cls": built["cross"], "qwen2-last-token": root / "bi"}


def test_qwen2_reranker_and_embedder_equal_sentence_transformers(
    backend: str, qwen2_models: dict[str, Path]
) -> None:
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    pairs = [(QUERY, document) for document in DOCUMENTS]
    cross = mlx_backend(qwen2_models["qwen2-seq-cls"])
    reference = CrossEncoder(str(qwen2_models["qwen2-seq-cls"]), device="cpu", local_files_only=True).predict(
        pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True
    )
    np.testing.assert_allclose(
        cross.forward(cross.tokenize_pairs(pairs)), reference.reshape(-1), atol=TOLERANCE, rtol=0
    )
    bi = mlx_backend(qwen2_models["qwen2-last-token"])
    vectors = bi.forward(bi.tokenize_texts(DOCUMENTS))
    reference = SentenceTransformer(str(qwen2_models["qwen2-last-token"]), device="cpu").encode(DOCUMENTS)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, reference, atol=TOLERANCE, rtol=0)


def test_causal_lm_reranker_gives_qwen3_reranker_probability_of_yes(
    backend: str, family_model: Callable[[str], Path]
) -> None:
    """sigmoid(logit(yes) - logit(no)) at the last real token = softmax([no, yes])[yes] of the
    model card's computation (left-padded there, right-padded here), through the template."""
    path = family_model("qwen3-reranker")
    model = mlx_backend(path)
    pairs = [(QUERY, document) for document in DOCUMENTS]
    items = model.tokenize_pairs([(QWEN3_RERANKER.query_part(query), document) for query, document in pairs])
    probabilities = 1.0 / (1.0 + np.exp(-model.forward(items).astype(np.float64)))
    np.testing.assert_allclose(probabilities, qwen3_reranker_scores(path, pairs), rtol=0, atol=TOLERANCE)
    assert model.info().instruction == QWEN3_RERANKER.default_instruction


def test_causal_lm_reranker_long_document_windows_equal_transformers(
    backend: str, family_model: Callable[[str], Path]
) -> None:
    """Each window (prefix, query part, a slice of the document, suffix) scores as transformers'
    causal LM does on the same tokens: logit(yes) - logit(no) at its last position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = family_model("qwen3-reranker")
    model = mlx_backend(path)
    document = " ".join(CORPUS_WORDS[i * 5 % len(CORPUS_WORDS)] for i in range(2600))
    [windows] = model.pair_windows([(QWEN3_RERANKER.query_part(QUERY), document)], overlap=32, max_windows=8)
    assert len(windows.items) >= 2
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    lm = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.inference_mode():
        last = [lm(input_ids=torch.tensor([list(item.ids)])).logits[0, -1] for item in windows.items]
    np.testing.assert_allclose(
        model.forward(windows.items), [float(row[yes] - row[no]) for row in last], rtol=0, atol=TOLERANCE
    )


def test_xlm_roberta_long_document_windows_equal_the_model_in_process(
    backend: str, family_model: Callable[[str], Path]
) -> None:
    """A document over the window is cut into overlapping windows (the tokenizer's overflow, whose
    document part it marks type 1); XLM-R has one token type, so every window is all type 0 (and
    the encoder reads type 0 whatever it is given), and scores as the model does in-process on
    the same tokens (positions from padding_idx + 1)."""
    import torch
    from sentence_transformers import CrossEncoder

    path = family_model("xlm-roberta-cross")
    model = mlx_backend(path)
    document = " ".join(CORPUS_WORDS[i * 7 % len(CORPUS_WORDS)] for i in range(1400))
    [windows] = model.pair_windows([(QUERY, document)], overlap=32, max_windows=8)
    assert len(windows.items) >= 3 and not windows.truncated
    assert max(len(item) for item in windows.items) == model.info().max_length
    assert all(set(item.type_ids) == {0} for item in windows.items)
    logits = model.forward(windows.items)
    typed = [Encoded(item.ids, [1] * len(item.ids)) for item in windows.items]
    np.testing.assert_array_equal(model.forward(typed), logits)
    hf_model = CrossEncoder(str(path), device="cpu", local_files_only=True).model.eval()
    with torch.inference_mode():
        reference = [
            hf_model(input_ids=torch.tensor([list(item.ids)])).logits.item() for item in windows.items
        ]
    np.testing.assert_allclose(logits, reference, rtol=0, atol=TOLERANCE)


# ---- what MLX cannot serve: refused at start-up, naming the family and what to use ------------


def _variant(source: Path, target: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    edit(target)
    return target


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _refusal(path: Path) -> str:
    settings = make_settings(local_model_path=str(path), backend="mlx")
    with pytest.raises(StartupError) as caught:
        create_backend(settings, resolve_model_source(settings))
    return str(caught.value)


def test_an_unserved_family_is_refused_by_name(
    backend: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    path = _variant(
        family_model("bert-mean"),
        tmp_path / "mpnet",
        lambda p: _edit_json(p / "config.json", model_type="mpnet"),
    )
    message = _refusal(path)
    assert message.startswith("MLX backend cannot serve 'mpnet' models (it serves bert, roberta, xlm-roberta")
    assert message.endswith("use BACKEND=torch (or BACKEND=onnx)")


@pytest.mark.parametrize(
    ("family", "module_dir", "changes", "expected"),
    [
        ("bert-mean", "1_Pooling", {"include_prompt": False}, "cannot pool without the prompt tokens"),
        (
            "bert-dense",
            "2_Dense",
            {"activation_function": "torch.nn.modules.activation.LeakyReLU"},
            "runs the Dense activations identity, tanh, relu, gelu, silu, sigmoid only",
        ),
        (
            "bert-cross",
            "",
            {"hidden_act": "quick_gelu"},
            "does not implement the bert activation hidden_act=",
        ),
        ("qwen3-seq-cls", "", {"use_sliding_window": True}, "does not run qwen3 sliding-window attention"),
    ],
)
def test_a_module_mlx_cannot_run_is_refused(
    backend: str,
    family: str,
    module_dir: str,
    changes: dict[str, object],
    expected: str,
    family_model: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    path = _variant(
        family_model(family),
        tmp_path / family,
        lambda p: _edit_json(p / module_dir / "config.json", **changes),
    )
    assert re.search(re.escape(expected) + r".*; use BACKEND=torch", _refusal(path))


def test_weights_other_than_safetensors_are_refused(
    backend: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    path = _variant(
        family_model("modernbert-cross"), tmp_path / "bin", lambda p: (p / "model.safetensors").unlink()
    )
    assert "MLX backend loads safetensors weights only and this modernbert model has none" in _refusal(path)


def test_auto_on_apple_silicon_serves_mlx_only_what_mlx_serves(
    backend: str, family_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """The factory asks mlx_refusal of the loaded model: torch (saying why) for a model MLX cannot
    serve, MLX for one it can (a Mac without MPS, so that torch runs on this CPU)."""
    from dataclasses import replace

    from tests.test_backend_selection import MAC_MLX

    mac = replace(MAC_MLX, mps=False, onnxruntime=False)  # float32 on this CPU: torch, not ONNX
    unserved = _variant(
        family_model("bert-mean"),
        tmp_path / "no-prompt-pooling",
        lambda p: _edit_json(p / "1_Pooling" / "config.json", include_prompt=False),
    )
    fallback = create_backend(make_settings(local_model_path=str(unserved), backend="auto"), machine=mac)
    assert (fallback.info().backend, fallback.info().device) == ("torch", "cpu")
    assert fallback.selection.startswith(
        "auto: Apple Silicon, but MLX backend cannot pool without the prompt"
    )
    served = create_backend(
        make_settings(local_model_path=str(family_model("xlm-roberta-cross")), backend="auto"), machine=mac
    )
    assert served.info().backend == "mlx"
    assert served.selection == "auto: Apple Silicon with mlx installed; DTYPE=float32"


def test_the_start_up_lists_name_what_the_mlx_code_implements(backend: str) -> None:
    """mlx_families decides without importing mlx: its lists must be the implementations' own."""
    from reranker.backends import mlx_families
    from reranker.backends.mlx_layers import ACTIVATIONS
    from reranker.backends.mlx_modules import DENSE_FUNCTIONS

    assert set(mlx_families.DENSE_ACTIVATIONS) == set(DENSE_FUNCTIONS)
    assert set(mlx_families.ENCODER_ACTIVATIONS) == set(ACTIVATIONS)
