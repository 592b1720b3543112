"""Tiny random-weight models, one per model family people serve, built locally in seconds.

Each builder writes a model directory the way its family ships: a sentence-transformers
bi-encoder or CrossEncoder (configs from ``transformers``, hidden size 32, 2 layers, fixed
seed) with a tokenizer of the family's own kind built here (WordPiece reused from the
embedded all-MiniLM-L6-v2, a Unigram XLM-R vocabulary, byte-level BPE for RoBERTa and Qwen);
nothing is downloaded. The Qwen3-Reranker-style model is a plain causal LM directory (as the
hub ships it): its scores come from the documented yes/no formula, see ``qwen3_reranker_scores``.

``build_family(name, target)`` builds one; tests get them through the session fixture
``family_model(name) -> Path`` (tests/conftest.py), which builds each once per session.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

SEED = 20261124
HIDDEN = 32
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 512
INIT_RANGE = 0.5

BI_ENCODER = "bi-encoder"
CROSS_ENCODER = "cross-encoder"
CAUSAL_RERANKER = "causal-lm-reranker"
CLASSIFIER = "classifier"
SPARSE = "sparse"

# Words the byte-level and unigram vocabularies learn as whole tokens (others split further).
_CORPUS = """
the a an of to and in is it for on with as was by that this are be has have from or at
berlin hamburg paris city capital population people million large port river weather rain
sun cloud wind cold warm today tomorrow query document passage relevant answer search web
what how many who where when which live lives germany france country number yes no
judge whether meets requirements based provided note can only instruct given retrieve
passages system user assistant think
"""
CORPUS_WORDS = tuple(_CORPUS.split())

QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANKER_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_EMBEDDING_PROMPTS = {
    "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
    "document": "",
}
E5_PROMPTS = {"query": "query: ", "document": "passage: "}


def _embedded_tokenizer_dir() -> Path:
    from reranker.backends.source import embedded_model_path

    return embedded_model_path()


# --- tokenizers ---------------------------------------------------------------------------


def _bert_tokenizer(model_input_names: Sequence[str] | None = None):
    from transformers import AutoTokenizer

    kwargs = {"model_input_names": list(model_input_names)} if model_input_names else {}
    return AutoTokenizer.from_pretrained(str(_embedded_tokenizer_dir()), **kwargs)


def _byte_level_bpe(
    special: Sequence[str], vocab_size: int = 600
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges learnt from CORPUS_WORDS (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = [w for w in CORPUS_WORDS for _ in range(10)]
    sentences = [" ".join(CORPUS_WORDS)] * 20 + [f" {w}" for w in words] + words  # "yes" and " yes"
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab, merges = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(vocab=vocab, merges=merges)


def _xlm_roberta_tokenizer():
    """A SentencePiece-style Unigram vocabulary, with XLM-R's special tokens and pair template."""
    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"▁{word}", -2.0 - i / 1000) for i, word in enumerate(CORPUS_WORDS)]
    pieces += [(char, -8.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'\"-:"]
    pieces += [(f"▁{char}", -7.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁", -9.0), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=pieces)


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen_tokenizer(append_eos: bool = False, padding_side: str = "left"):
    """Qwen2's byte-level BPE with its chat markers; ``append_eos`` is Qwen3-Embedding's
    post-processor (every text ends in <|endoftext|>, the token its last-token pooling reads)."""
    from tokenizers import processors
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe(QWEN_SPECIAL)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side=padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    for word in ("yes", "no"):
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word
    if append_eos:
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>",
            pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eos)],
        )
    return tokenizer


# --- transformer configs ------------------------------------------------------------------


def _config(family: str, tokenizer, **extra: object):
    from transformers import (
        BertConfig,
        DistilBertConfig,
        ModernBertConfig,
        Qwen3Config,
        RobertaConfig,
        XLMRobertaConfig,
    )

    vocab_size = len(tokenizer)
    # Weights far wider than a fresh model's (0.02), so that scores and vectors differ enough
    # between inputs for a wrong pooling, token type or template to show.
    common = {
        "vocab_size": vocab_size,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": INIT_RANGE,
        **extra,
    }
    if family == "bert":
        return BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            **common,
        )
    if family == "distilbert":
        return DistilBertConfig(
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            **common,
        )
    if family in ("roberta", "xlm-roberta"):
        config_class = RobertaConfig if family == "roberta" else XLMRobertaConfig
        return config_class(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS + 2,  # positions start after the padding id
            type_vocab_size=1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **common,
        )
    if family == "modernbert":
        return ModernBertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=1024,
            global_attn_every_n_layers=2,
            local_attention=16,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            **common,
        )
    if family == "qwen3":
        return Qwen3Config(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            **common,
        )
    raise ValueError(family)


def _hf_model(family: str, task: str, tokenizer, target: Path, **extra: object) -> Path:
    """The bare transformers model (random weights, fixed seed) with its tokenizer, saved."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    config = _config(family, tokenizer, **extra)
    if task == "sequence-classification":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    elif task == "causal-lm":
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModel.from_config(config)
    model.eval()
    tokenizer.model_max_length = min(MAX_POSITIONS, config.max_position_embeddings)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


# --- sentence-transformers wrappers ---------------------------------------------------------


def _bi_encoder(
    family: str,
    tokenizer,
    target: Path,
    pooling: str,
    dense_out: int | None = None,
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    hf_dir = _hf_model(family, "feature-extraction", tokenizer, target.parent / f"{target.name}-hf")
    torch.manual_seed(SEED)
    transformer = Transformer(str(hf_dir))
    modules: list = [transformer, Pooling(HIDDEN, pooling_mode=pooling)]
    if dense_out:
        modules.append(Dense(HIDDEN, dense_out, activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts or {})
    model.save(str(target))
    return target


def _cross_encoder(family: str, tokenizer, target: Path) -> Path:
    from sentence_transformers import CrossEncoder

    hf_dir = _hf_model(family, "sequence-classification", tokenizer, target.parent / f"{target.name}-hf")
    CrossEncoder(str(hf_dir), num_labels=1, device="cpu").save(str(target))
    return target


def _old_pooling_format(target: Path) -> Path:
    """Rewrite a saved Pooling config in the pre-v6 format (``pooling_mode_*_token`` booleans)."""
    modules = json.loads((target / "modules.json").read_text())
    pooling_dir = next(target / m["path"] for m in modules if m["type"].endswith("Pooling"))
    config = json.loads((pooling_dir / "config.json").read_text())
    mode = config.pop("pooling_mode")
    old_keys = {
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": mode == "max",
        "pooling_mode_mean_sqrt_len_tokens": mode == "mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens": mode == "weightedmean",
        "pooling_mode_lasttoken": mode == "lasttoken",
    }
    config = {"word_embedding_dimension": config.pop("embedding_dimension", HIDDEN), **old_keys, **config}
    (pooling_dir / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _causal_reranker(target: Path) -> Path:
    return _hf_model("qwen3", "causal-lm", _qwen_tokenizer(padding_side="left"), target)


BUILDERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "bert-mean": (BI_ENCODER, lambda t: _bi_encoder("bert", _bert_tokenizer(), t, "mean")),
    "bert-cls": (BI_ENCODER, lambda t: _bi_encoder("bert", _bert_tokenizer(), t, "cls")),
    "bert-cls-old-config": (
        BI_ENCODER,
        lambda t: _old_pooling_format(_bi_encoder("bert", _bert_tokenizer(), t, "cls")),
    ),
    "bert-dense": (BI_ENCODER, lambda t: _bi_encoder("bert", _bert_tokenizer(), t, "cls", dense_out=24)),
    "bert-prompts": (
        BI_ENCODER,
        lambda t: _bi_encoder("bert", _bert_tokenizer(), t, "mean", prompts=E5_PROMPTS),
    ),
    "xlm-roberta-bi": (BI_ENCODER, lambda t: _bi_encoder("xlm-roberta", _xlm_roberta_tokenizer(), t, "mean")),
    "modernbert-bi": (
        BI_ENCODER,
        lambda t: _bi_encoder("modernbert", _bert_tokenizer(["input_ids", "attention_mask"]), t, "mean"),
    ),
    "qwen3-last-token": (
        BI_ENCODER,
        lambda t: _bi_encoder(
            "qwen3", _qwen_tokenizer(append_eos=True), t, "lasttoken", prompts=QWEN3_EMBEDDING_PROMPTS
        ),
    ),
    "bert-cross": (CROSS_ENCODER, lambda t: _cross_encoder("bert", _bert_tokenizer(), t)),
    "distilbert-cross": (
        CROSS_ENCODER,
        lambda t: _cross_encoder("distilbert", _bert_tokenizer(["input_ids", "attention_mask"]), t),
    ),
    "roberta-cross": (CROSS_ENCODER, lambda t: _cross_encoder("roberta", _roberta_tokenizer(), t)),
    "xlm-roberta-cross": (
        CROSS_ENCODER,
        lambda t: _cross_encoder("xlm-roberta", _xlm_roberta_tokenizer(), t),
    ),
    "modernbert-cross": (
        CROSS_ENCODER,
        lambda t: _cross_encoder("modernbert", _bert_tokenizer(["input_ids", "attention_mask"]), t),
    ),
    "qwen3-seq-cls": (CROSS_ENCODER, lambda t: _cross_encoder("qwen3", _qwen_tokenizer(), t)),
    "qwen3-reranker": (CAUSAL_RERANKER, _causal_reranker),
}


def _kind_model(build: str, **options: object) -> Callable[[Path], Path]:
    """A builder of tests/kind_models.py (imported when called: it imports this module)."""

    def built(target: Path) -> Path:
        from tests import kind_models

        if build == "inference_free_splade":
            return kind_models.inference_free_splade(
                target, kind_models.splade(target.parent / "splade-for-free")
            )
        return getattr(kind_models, build)(target, **options)

    return built


# The other kinds (tests/test_model_kinds.py checks their routes): in the family table too.
KIND_BUILDERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "bert-classifier": (CLASSIFIER, _kind_model("classifier")),
    "bert-multi-label": (
        CLASSIFIER,
        _kind_model("classifier", labels=("sports", "politics", "weather", "science"), multi_label=True),
    ),
    "bert-splade": (SPARSE, _kind_model("splade")),
    "bert-splade-inference-free": (SPARSE, _kind_model("inference_free_splade")),
}

FAMILIES = tuple(BUILDERS)  # rerank and embedding families (every route of the HTTP tests)
TABLE = FAMILIES + tuple(KIND_BUILDERS)  # the rows of docs/MODELS.md's family table

# What the table calls each row (a family, and a model like it on the hub).
LABELS = {
    "bert-mean": "BERT mean-pooled bi-encoder (all-MiniLM-L6-v2)",
    "bert-cls": "BERT CLS-pooled bi-encoder (bge-small/base)",
    "bert-cls-old-config": "BERT CLS-pooled, pre-v6 pooling config (older bge copies)",
    "bert-dense": "BERT + Dense layer (LaBSE)",
    "bert-prompts": "bi-encoder with prompts (e5)",
    "xlm-roberta-bi": "XLM-RoBERTa bi-encoder (multilingual-e5, bge-m3)",
    "modernbert-bi": "ModernBERT bi-encoder (modernbert-embed)",
    "qwen3-last-token": "Qwen3 last-token bi-encoder with prompts (Qwen3-Embedding)",
    "bert-cross": "BERT cross-encoder (ms-marco-MiniLM)",
    "distilbert-cross": "DistilBERT cross-encoder",
    "roberta-cross": "RoBERTa cross-encoder",
    "xlm-roberta-cross": "XLM-RoBERTa cross-encoder (bge-reranker-v2-m3)",
    "modernbert-cross": "ModernBERT cross-encoder (gte-reranker-modernbert-base)",
    "qwen3-seq-cls": "Qwen3 sequence-classification cross-encoder",
    "qwen3-reranker": "Qwen3-Reranker causal LM, yes/no logits",
    "bert-classifier": "BERT classifier, 3 labels, texts and pairs",
    "bert-multi-label": "BERT multi-label classifier (go_emotions-like)",
    "bert-splade": "SPLADE on a BERT masked-LM (splade-v3-like)",
    "bert-splade-inference-free": "inference-free SPLADE, its documents (opensearch-like)",
}
BACKENDS = {"torch": "torch", "onnx": "ONNX fp32", "mlx": "MLX"}  # BACKEND value -> column
TABLE_START = "<!-- family-table: written by test_multi_backend.py --families --write-docs -->"
TABLE_END = "<!-- /family-table -->"


def family_kind(name: str) -> str:
    return {**BUILDERS, **KIND_BUILDERS}[name][0]


def build_family(name: str, target: Path) -> Path:
    """Build family ``name`` into the directory ``target`` (created) and return it."""
    return {**BUILDERS, **KIND_BUILDERS}[name][1](target)


def expected(name: str, backend: str) -> str:
    """What the table promises: "exact", or "refused" (at start-up, naming the backend to use)."""
    return "refused" if backend == "mlx" and family_kind(name) in (CLASSIFIER, SPARSE) else "exact"


def family_table(cells: dict[str, dict[str, str]]) -> str:
    """The markdown table of ``cells[family][backend]`` (docs/MODELS.md; test_multi_backend.py
    --families writes it from a run)."""
    lines = ["| family (like) | " + " | ".join(BACKENDS.values()) + " |", "|---|" + "---|" * len(BACKENDS)]
    for name in TABLE:
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells[name][b] for b in BACKENDS) + " |")
    return "\n".join(lines)


# --- the causal-LM reranker's documented scoring formula (the oracle) ------------------------


def qwen3_reranker_text(query: str, document: str, instruction: str = QWEN3_RERANKER_INSTRUCTION) -> str:
    body = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    return QWEN3_RERANKER_PREFIX + body + QWEN3_RERANKER_SUFFIX


def qwen3_reranker_scores(
    model_dir: Path, pairs: Sequence[tuple[str, str]], instruction: str = QWEN3_RERANKER_INSTRUCTION
) -> list[float]:
    """Qwen3-Reranker's model-card computation: P("yes") = softmax over the ["no", "yes"] logits at
    the last position of the left-padded template (transformers only, in-process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    texts = [qwen3_reranker_text(q, d, instruction) for q, d in pairs]
    inputs = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        logits = model(**inputs).logits[:, -1, :]
    pair_logits = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    return torch.softmax(pair_logits.float(), dim=1)[:, 1].tolist()


# --- the oracle of the family matrix (tests/test_model_families.py, test_multi_backend.py) ----

TOLERANCE = 1e-4
QUERY = "what is the population of berlin"
DOCUMENTS = [
    "berlin has 3 million people living in the city",
    "rain today",
    "hamburg has a large port on the river",
    "the weather in paris is warm and the sun is out today, no wind and no cloud",
]
TEXTS = [QUERY, *DOCUMENTS]


def reference_scores(path: Path, name: str, pairs: Sequence[tuple[str, str]]):
    """What the model's own library answers for ``pairs``: its activation of the logit (P(yes)
    for the causal-LM reranker, by the model card's formula)."""
    import numpy as np

    if family_kind(name) == CAUSAL_RERANKER:
        return np.array(qwen3_reranker_scores(path, pairs))
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(path), device="cpu").predict(list(pairs))


PAIR = (QUERY, DOCUMENTS[0])  # a classifier's pair input


def tolerance(name: str, want) -> float:
    """TOLERANCE; for sparse weights, of their scale (ONNX Runtime sums a vocabulary-sized head
    in another order: about 1e-5 of the scale)."""
    import numpy as np

    return TOLERANCE * max(1.0, float(np.abs(want).max())) if family_kind(name) == SPARSE else TOLERANCE


def reference_output(path: Path, name: str):
    """The in-process library's answer: sentence-transformers' vectors of TEXTS (bi-encoder) or
    scores of (QUERY, DOCUMENTS); transformers' label logits of PAIR and TEXTS (classifier);
    SparseEncoder's document weights of TEXTS (sparse)."""
    if family_kind(name) == CLASSIFIER:
        from tests.kind_models import classifier_logits

        return classifier_logits(path, [PAIR, *TEXTS])
    if family_kind(name) == SPARSE:
        from sentence_transformers import SparseEncoder

        encoded = SparseEncoder(str(path), device="cpu").encode_document(TEXTS, convert_to_tensor=True)
        return encoded.to_dense().numpy()
    if family_kind(name) == BI_ENCODER:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    return reference_scores(path, name, [(QUERY, doc) for doc in DOCUMENTS])


def served_output(backend, name: str):
    """A backend's answer to what ``reference_output`` answers (vectors normalised as the model
    does; scores through the sigmoid every family here declares)."""
    import numpy as np

    from reranker.backends.templates import QWEN3_RERANKER

    if family_kind(name) == CLASSIFIER:
        return backend.forward(backend.tokenize_pairs([PAIR]) + backend.tokenize_texts(TEXTS))
    if family_kind(name) == SPARSE:
        return backend.forward(backend.tokenize_texts(TEXTS))
    if family_kind(name) == BI_ENCODER:
        vectors = backend.embed_texts(TEXTS)
        if backend.info().normalize_embeddings:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors
    query = QWEN3_RERANKER.query_part(QUERY) if family_kind(name) == CAUSAL_RERANKER else QUERY
    logits = backend.score_pairs([(query, doc) for doc in DOCUMENTS])
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
