"""What every MLX model here is made of: named weights, linear, layer norm, activations, attention.

Weights are a flat ``{name: mx.array}`` in float32, read from the model's safetensors
files with the architecture prefix (``bert.``, ``roberta.``, ``model.`` ...) removed, so
a sequence-classification checkpoint and a bare encoder read the same names. A bias is
added where the checkpoint has one: configs that say ``*_bias: false`` simply have none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import mlx.core as mx

from reranker.errors import StartupError

Activation = Callable[[mx.array], mx.array]


def load_weights(root: Path, prefixes: Iterable[str], dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """Every tensor of ``model.safetensors`` (or its shards) in ``dtype``, ``prefixes`` removed."""
    files = sorted(root.glob("model*.safetensors"))
    if not files:
        raise StartupError(f"MLX backend: {root} has no model.safetensors (only safetensors weights load)")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))  # type: ignore[arg-type]
    prefixes = tuple(prefixes)
    stripped = {}
    for name, value in weights.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        stripped[name] = value.astype(dtype)
    mx.eval(stripped)
    return stripped


class Weights:
    """Named float32 tensors and the three operations every layer reads them with."""

    def __init__(self, tensors: dict[str, mx.array]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> mx.array:
        try:
            return self.tensors[name]
        except KeyError:
            raise StartupError(f"MLX backend: the checkpoint has no weight {name!r}") from None

    def require(self, *names: str) -> None:
        """Start-up check: a missing tensor is an error at load, not at the first request."""
        for name in names:
            self[name]

    def linear(self, x: mx.array, name: str) -> mx.array:
        out = x @ self[f"{name}.weight"].T
        bias = self.tensors.get(f"{name}.bias")
        return out if bias is None else out + bias

    def layer_norm(self, x: mx.array, name: str, eps: float) -> mx.array:
        return mx.fast.layer_norm(x, self[f"{name}.weight"], self.tensors.get(f"{name}.bias"), eps)


def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU that transformers' "gelu" means."""
    return x * 0.5 * (1.0 + mx.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: mx.array) -> mx.array:
    """transformers' "gelu_new" / "gelu_pytorch_tanh": the tanh approximation."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS: dict[str, Activation] = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": lambda x: mx.maximum(x, 0.0),
    "silu": lambda x: x * mx.sigmoid(x),
    "swish": lambda x: x * mx.sigmoid(x),
    "tanh": mx.tanh,
}


def activation(name: str, family: str) -> Activation:
    if name not in ACTIVATIONS:
        raise StartupError(
            f"MLX backend: {family} activation {name!r} is not implemented "
            f"(known: {', '.join(ACTIVATIONS)}); use BACKEND=torch"
        )
    return ACTIVATIONS[name]


def split_heads(x: mx.array, heads: int) -> mx.array:
    """[batch, length, heads * head] -> [batch, heads, length, head]."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(0, 2, 1, 3)


def attend(q: mx.array, k: mx.array, v: mx.array, additive: mx.array) -> mx.array:
    """Scaled dot-product attention over split heads, merged back to [batch, length, width]."""
    batch, heads, length, head = q.shape
    context = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head), mask=additive)
    return context.transpose(0, 2, 1, 3).reshape(batch, length, heads * head)


def padding_mask(mask: mx.array) -> mx.array:
    """An additive [batch, 1, 1, length] mask: padding is never attended to."""
    return ((1.0 - mask) * -1e9)[:, None, None, :]
