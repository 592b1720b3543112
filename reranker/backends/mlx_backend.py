"""MLX backend: a BERT-family encoder written with mlx.core, on Apple Silicon (or CPU elsewhere).

Our own small module, not a model zoo: it reads the model's ``config.json``,
``model.safetensors`` and ``tokenizer.json``, and runs embeddings -> N encoder layers
(self-attention, GELU feed-forward, post-LayerNorm) in float32. Bi-encoders then pool
as their sentence-transformers config says (mean or CLS); cross-encoders run the BERT
pooler (tanh) and the single-logit classifier. There is no dropout in this forward
pass, so it is always the model in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from reranker.backends.base import Encoded, ModelInfo, ModelKind
from reranker.backends.source import ModelSource, pooling_of, read_json
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend
from reranker.errors import StartupError

SUPPORTED = ("bert",)


def _max_length(root: Path, config: dict[str, Any]) -> int:
    sentence = read_json(root / "sentence_bert_config.json").get("max_seq_length")
    if sentence:
        return int(sentence)
    declared = read_json(root / "tokenizer_config.json").get("model_max_length")
    if isinstance(declared, int) and declared < 100_000:
        return declared
    return int(config.get("max_position_embeddings", 512))


class MlxBackend(TokenizedBackend):
    def __init__(self, source: ModelSource) -> None:
        root = Path(source.path)
        self._source = source
        self._config = read_json(root / "config.json")
        if self._config.get("model_type") not in SUPPORTED:
            raise StartupError(
                f"MLX backend: model type {self._config.get('model_type')!r} is not supported "
                f"(supported: {', '.join(SUPPORTED)}); use BACKEND=torch"
            )
        weights_file = root / "model.safetensors"
        if not weights_file.is_file():
            raise StartupError(f"MLX backend: {weights_file} is missing (only safetensors weights load)")
        weights = mx.load(str(weights_file))
        self._w = {name.removeprefix("bert."): value.astype(mx.float32) for name, value in weights.items()}
        self._max_length = _max_length(root, self._config)
        self._pooling, self._normalizes = pooling_of(root, "MLX backend")
        self._heads = int(self._config["num_attention_heads"])
        self._layers = int(self._config["num_hidden_layers"])
        self._eps = float(self._config.get("layer_norm_eps", 1e-12))
        if source.kind is ModelKind.CROSS_ENCODER and "classifier.weight" not in self._w:
            raise StartupError("MLX backend: the cross-encoder has no classifier weights")
        if source.kind is ModelKind.CROSS_ENCODER and self._w["classifier.weight"].shape[0] != 1:
            raise StartupError("MLX backend: only single-label cross-encoders can be served")
        pad_id = int(self._config.get("pad_token_id") or 0)
        self.tokenizer = TextTokenizer.from_file(root / "tokenizer.json", self._max_length, pad_id)
        mx.eval(self._w)

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self._source.name,
            kind=self._source.kind,
            backend="mlx",
            device=str(mx.default_device()).removeprefix("Device(").split(",")[0],
            max_length=self._max_length,
            dimension=int(self._config["hidden_size"]) if self._source.kind is ModelKind.BI_ENCODER else None,
            normalize_embeddings=self._normalizes,
            dtype="float32",
        )

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        arrays = self.tokenizer.collate(batch)
        ids = mx.array(arrays["input_ids"].astype(np.int32))
        types = mx.array(arrays["token_type_ids"].astype(np.int32))
        mask = mx.array(arrays["attention_mask"].astype(np.float32))
        hidden = self._encode(ids, types, mask)
        if self._source.kind is ModelKind.CROSS_ENCODER:
            pooled = mx.tanh(self._linear(hidden[:, 0], "pooler.dense"))
            output = self._linear(pooled, "classifier").reshape(-1)
        elif self._pooling == "cls":
            output = hidden[:, 0]
        else:
            weights = mask[:, :, None]
            output = (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)
        mx.eval(output)
        return np.array(output, dtype=np.float32)

    # ---- the encoder -----------------------------------------------------------------

    def _linear(self, x: mx.array, name: str) -> mx.array:
        return x @ self._w[f"{name}.weight"].T + self._w[f"{name}.bias"]

    def _norm(self, x: mx.array, name: str) -> mx.array:
        return mx.fast.layer_norm(x, self._w[f"{name}.weight"], self._w[f"{name}.bias"], self._eps)

    def _encode(self, ids: mx.array, types: mx.array, mask: mx.array) -> mx.array:
        w = self._w
        positions = mx.arange(ids.shape[1])
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions][None]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        additive = ((1.0 - mask) * -1e9)[:, None, None, :]  # padding never attended to
        for i in range(self._layers):
            x = self._layer(x, additive, f"encoder.layer.{i}")
        return x

    def _layer(self, x: mx.array, additive: mx.array, name: str) -> mx.array:
        batch, length, width = x.shape
        head = width // self._heads

        def split(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self._heads, head).transpose(0, 2, 1, 3)

        q = split(self._linear(x, f"{name}.attention.self.query"))
        k = split(self._linear(x, f"{name}.attention.self.key"))
        v = split(self._linear(x, f"{name}.attention.self.value"))
        context = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head), mask=additive)
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, width)
        x = self._norm(
            self._linear(context, f"{name}.attention.output.dense") + x, f"{name}.attention.output.LayerNorm"
        )
        inner = _gelu(self._linear(x, f"{name}.intermediate.dense"))
        return self._norm(self._linear(inner, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")


def _gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU that BERT's "gelu" means."""
    return x * 0.5 * (1.0 + mx.erf(x / math.sqrt(2.0)))
