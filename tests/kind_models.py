"""Tiny random-weight models of the kinds beyond bi-encoders and rerankers, built in seconds:
sequence classifiers (3 labels, multi-label) as plain transformers directories (as the hub ships
them), and a SPLADE sparse encoder (a BERT masked-LM under sentence-transformers' SparseEncoder).
Each reuses tests/families.py's tiny BERT configuration and the embedded model's WordPiece."""

from __future__ import annotations

from pathlib import Path

from tests.families import HIDDEN, SEED, _bert_tokenizer, _config

SENTIMENT = ("negative", "neutral", "positive")
TOPICS = ("sports", "politics", "weather", "science")


def classifier(target: Path, labels: tuple[str, ...] = SENTIMENT, multi_label: bool = False) -> Path:
    """A BertForSequenceClassification with ``labels`` (id2label), saved with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = _bert_tokenizer()
    extra: dict[str, object] = {
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }
    if multi_label:
        extra["problem_type"] = "multi_label_classification"
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_config(_config("bert", tokenizer, **extra)).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


def splade(target: Path) -> Path:
    """A SPLADE model: a tiny BERT masked-LM with max pooling of log(1 + relu(logits))."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertForMaskedLM

    tokenizer = _bert_tokenizer()
    hf_dir = target.parent / f"{target.name}-hf"
    torch.manual_seed(SEED)
    BertForMaskedLM(_config("bert", tokenizer)).eval().save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))
    model = SparseEncoder(modules=[MLMTransformer(str(hf_dir)), SpladePooling("max")], device="cpu")
    model.save(str(target))
    assert HIDDEN  # the same tiny shape as tests/families.py's models
    return target


def classifier_logits(path: Path, inputs: list[str | tuple[str, str]]):
    """The logits transformers computes in-process for ``inputs`` (texts or pairs), one at a time."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    rows = []
    with torch.inference_mode():
        for item in inputs:
            encoded = tokenizer(
                *([item] if isinstance(item, str) else item), return_tensors="pt", truncation=True
            )
            rows.append(model(**encoded).logits[0].numpy())
    return np.array(rows, dtype=np.float64)


def inference_free_splade(target: Path, splade_dir: Path) -> Path:
    """An inference-free sparse model: queries through a static token-weight table
    (SparseStaticEmbedding), documents through the SPLADE model, chosen by a Router."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.router import Router
    from sentence_transformers.sparse_encoder.modules import (
        MLMTransformer,
        SparseStaticEmbedding,
        SpladePooling,
    )

    hf_dir = splade_dir.parent / f"{splade_dir.name}-hf"
    document = MLMTransformer(str(hf_dir))
    router = Router.for_query_document(
        query_modules=[SparseStaticEmbedding(tokenizer=document.tokenizer, frozen=False)],
        document_modules=[document, SpladePooling("max")],
    )
    SparseEncoder(modules=[router], device="cpu").save(str(target))
    return target
