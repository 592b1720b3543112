"""Bidirectional encoders in mlx.core: BERT, RoBERTa / XLM-RoBERTa, DistilBERT, ModernBERT.

Each reads transformers' config.json and checkpoint names and reproduces its
``*Model`` forward pass (token states) and its ``*ForSequenceClassification`` head
(one logit), in float32 with no dropout: the model in eval mode. Inputs are
right-padded; ``mask`` is 1 on real tokens.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from reranker.backends.mlx_layers import Weights, activation, attend, padding_mask, split_heads
from reranker.errors import StartupError

# Checkpoint prefixes of the sequence-classification wrappers (a bare encoder has none).
PREFIXES = ("bert.", "roberta.", "distilbert.", "model.")


class Encoder:
    """An encoder's token states, and its classification head's single logit."""

    family: str
    width: int

    def hidden_states(self, ids: mx.array, types: mx.array, mask: mx.array) -> mx.array:
        raise NotImplementedError

    def score(self, hidden: mx.array, mask: mx.array) -> mx.array:
        raise NotImplementedError


class BertEncoder(Encoder):
    """BERT, and RoBERTa / XLM-RoBERTa / CamemBERT (the same layers; other positions and head)."""

    def __init__(self, config: dict[str, Any], weights: Weights, family: str) -> None:
        self.family = family
        self.w = weights
        self.width = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.act = activation(str(config.get("hidden_act", "gelu")), family)
        self.roberta_style = family != "bert"
        self.pad_id = int(config.get("pad_token_id") or 0)
        self.single_type = int(config.get("type_vocab_size", 2)) == 1
        weights.require("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")

    def _positions(self, ids: mx.array) -> mx.array:
        if not self.roberta_style:
            return mx.broadcast_to(mx.arange(ids.shape[1]), ids.shape)
        # transformers' create_position_ids_from_input_ids: count real tokens from padding_idx + 1
        real = (ids != self.pad_id).astype(mx.int32)
        return mx.cumsum(real, axis=1) * real + self.pad_id

    def hidden_states(self, ids: mx.array, types: mx.array, mask: mx.array) -> mx.array:
        w = self.w
        if self.single_type:
            types = mx.zeros_like(types)  # one token type: a window's document part is type 0 too
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][self._positions(ids)]
        )
        if "embeddings.token_type_embeddings.weight" in w:
            x = x + w["embeddings.token_type_embeddings.weight"][types]
        x = w.layer_norm(x, "embeddings.LayerNorm", self.eps)
        additive = padding_mask(mask)
        for i in range(self.layers):
            x = self._layer(x, additive, f"encoder.layer.{i}")
        return x

    def _layer(self, x: mx.array, additive: mx.array, name: str) -> mx.array:
        w = self.w
        q = split_heads(w.linear(x, f"{name}.attention.self.query"), self.heads)
        k = split_heads(w.linear(x, f"{name}.attention.self.key"), self.heads)
        v = split_heads(w.linear(x, f"{name}.attention.self.value"), self.heads)
        context = attend(q, k, v, additive)
        x = w.layer_norm(
            w.linear(context, f"{name}.attention.output.dense") + x,
            f"{name}.attention.output.LayerNorm",
            self.eps,
        )
        inner = self.act(w.linear(x, f"{name}.intermediate.dense"))
        return w.layer_norm(w.linear(inner, f"{name}.output.dense") + x, f"{name}.output.LayerNorm", self.eps)

    def score(self, hidden: mx.array, mask: mx.array) -> mx.array:
        first = hidden[:, 0]
        if self.roberta_style:  # RobertaClassificationHead: dense, tanh, out_proj on <s>
            return self.w.linear(mx.tanh(self.w.linear(first, "classifier.dense")), "classifier.out_proj")
        return self.w.linear(mx.tanh(self.w.linear(first, "pooler.dense")), "classifier")


class DistilBertEncoder(Encoder):
    def __init__(self, config: dict[str, Any], weights: Weights) -> None:
        self.family = "distilbert"
        self.w = weights
        self.width = int(config["dim"])
        self.heads = int(config["n_heads"])
        self.layers = int(config["n_layers"])
        self.act = activation(str(config.get("activation", "gelu")), self.family)
        weights.require("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")

    def hidden_states(self, ids: mx.array, types: mx.array, mask: mx.array) -> mx.array:
        w = self.w
        positions = mx.arange(ids.shape[1])
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions][None]
        )
        x = w.layer_norm(x, "embeddings.LayerNorm", 1e-12)
        additive = padding_mask(mask)
        for i in range(self.layers):
            name = f"transformer.layer.{i}"
            q = split_heads(w.linear(x, f"{name}.attention.q_lin"), self.heads)
            k = split_heads(w.linear(x, f"{name}.attention.k_lin"), self.heads)
            v = split_heads(w.linear(x, f"{name}.attention.v_lin"), self.heads)
            context = w.linear(attend(q, k, v, additive), f"{name}.attention.out_lin")
            x = w.layer_norm(context + x, f"{name}.sa_layer_norm", 1e-12)
            inner = w.linear(self.act(w.linear(x, f"{name}.ffn.lin1")), f"{name}.ffn.lin2")
            x = w.layer_norm(inner + x, f"{name}.output_layer_norm", 1e-12)
        return x

    def score(self, hidden: mx.array, mask: mx.array) -> mx.array:
        pre = mx.maximum(self.w.linear(hidden[:, 0], "pre_classifier"), 0.0)
        return self.w.linear(pre, "classifier")


class ModernBertEncoder(Encoder):
    """ModernBERT: pre-norm layers, rotary positions (a global and a local base), full attention
    every ``global_attn_every_n_layers`` layers and a sliding window (|i - j| <= local_attention
    // 2) in the others, a GeGLU feed-forward, and biases only where the config asks."""

    def __init__(self, config: dict[str, Any], weights: Weights) -> None:
        self.family = "modernbert"
        self.w = weights
        self.width = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("norm_eps", 1e-5))
        self.act = activation(str(config.get("hidden_activation", "gelu")), self.family)
        self.head_act = activation(str(config.get("classifier_activation", "gelu")), self.family)
        self.pooling = str(config.get("classifier_pooling", "cls"))
        self.half_window = int(config.get("local_attention", 128)) // 2
        every = int(config.get("global_attn_every_n_layers", 3))
        default_types = ["sliding_attention" if i % every else "full_attention" for i in range(self.layers)]
        self.layer_types = list(config.get("layer_types") or default_types)
        self.theta = _rope_thetas(config)
        weights.require("embeddings.tok_embeddings.weight", "embeddings.norm.weight", "final_norm.weight")

    def hidden_states(self, ids: mx.array, types: mx.array, mask: mx.array) -> mx.array:
        w = self.w
        length = ids.shape[1]
        x = w.layer_norm(w["embeddings.tok_embeddings.weight"][ids], "embeddings.norm", self.eps)
        padding = padding_mask(mask)
        distance = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
        band = mx.array(np.where(distance <= self.half_window, 0.0, -1e9).astype(np.float32))
        masks = {"full_attention": padding, "sliding_attention": padding + band[None, None]}
        rotations = {
            kind: _rotation(length, self.width // self.heads, self.theta[kind]) for kind in self.theta
        }
        for i in range(self.layers):
            kind = self.layer_types[i]
            name = f"layers.{i}"
            normed = x if i == 0 else w.layer_norm(x, f"{name}.attn_norm", self.eps)
            x = x + self._attention(normed, masks[kind], rotations[kind], name)
            x = x + self._mlp(w.layer_norm(x, f"{name}.mlp_norm", self.eps), name)
        return w.layer_norm(x, "final_norm", self.eps)

    def _attention(
        self, x: mx.array, additive: mx.array, rotation: tuple[mx.array, mx.array], name: str
    ) -> mx.array:
        qkv = self.w.linear(x, f"{name}.attn.Wqkv")
        q, k, v = (split_heads(part, self.heads) for part in mx.split(qkv, 3, axis=-1))
        cos, sin = rotation
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return self.w.linear(attend(q, k, v, additive), f"{name}.attn.Wo")

    def _mlp(self, x: mx.array, name: str) -> mx.array:
        inner, gate = mx.split(self.w.linear(x, f"{name}.mlp.Wi"), 2, axis=-1)
        return self.w.linear(self.act(inner) * gate, f"{name}.mlp.Wo")

    def score(self, hidden: mx.array, mask: mx.array) -> mx.array:
        if self.pooling == "mean":
            weights = mask[:, :, None]
            pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
        else:
            pooled = hidden[:, 0]
        head = self.w.layer_norm(self.head_act(self.w.linear(pooled, "head.dense")), "head.norm", self.eps)
        return self.w.linear(head, "classifier")


def _rope_thetas(config: dict[str, Any]) -> dict[str, float]:
    """Rotary bases per layer type, from either config format (``rope_parameters``, or the older
    ``global_rope_theta`` / ``local_rope_theta``)."""
    declared = config.get("rope_parameters") or {}
    thetas = {}
    for kind, old_key, default in (
        ("full_attention", "global_rope_theta", 160_000.0),
        ("sliding_attention", "local_rope_theta", 10_000.0),
    ):
        params = declared.get(kind) or {}
        if params.get("rope_type", "default") != "default" or config.get("rope_scaling"):
            raise StartupError(
                "MLX backend: ModernBERT with scaled rotary embeddings is not implemented; use BACKEND=torch"
            )
        thetas[kind] = float(params.get("rope_theta", config.get(old_key, default)))
    return thetas


def _rotation(length: int, head: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin [length, head] of the rotate-half rotary embedding, in float32 as transformers does."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head, 2, dtype=np.float32) / np.float32(head)))
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return mx.array(np.cos(angles)), mx.array(np.sin(angles))


def _rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "modernbert")


def build_encoder(config: dict[str, Any], weights: Weights) -> Encoder:
    family = str(config.get("model_type"))
    if family == "distilbert":
        return DistilBertEncoder(config, weights)
    if family == "modernbert":
        return ModernBertEncoder(config, weights)
    if family in ("bert", "roberta", "xlm-roberta", "camembert"):
        return BertEncoder(config, weights, family)
    raise StartupError(f"MLX backend: {family!r} is not an encoder family it implements")
