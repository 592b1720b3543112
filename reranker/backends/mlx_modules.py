"""A bi-encoder's sentence-transformers modules after the transformer, on MLX: Pooling and Dense.

Pooling follows sentence-transformers' ``Pooling`` on right-padded input (every mode it
has; several modes are concatenated in the order given); a ``Dense`` module is its linear
layer and activation, with the weights from its folder. Normalisation
is post-processing (the server's, per request), so it is not run here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from reranker.backends.mlx_layers import ACTIVATIONS, Activation
from reranker.backends.source import DenseLayer
from reranker.errors import StartupError

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

# A Dense module's activation, by the lower-cased torch class name source.read_layout gives.
DENSE_FUNCTIONS: dict[str, Activation] = {
    "identity": lambda x: x,
    "tanh": ACTIVATIONS["tanh"],
    "relu": ACTIVATIONS["relu"],
    "gelu": ACTIVATIONS["gelu"],
    "silu": ACTIVATIONS["silu"],
    "sigmoid": mx.sigmoid,
}


def pool(hidden: mx.array, mask: mx.array, modes: Sequence[str]) -> mx.array:
    """[batch, length, width] token states -> [batch, width * len(modes)]."""
    weights = mask[:, :, None]
    counts = mx.maximum(weights.sum(axis=1), 1e-9)
    lengths = mask.sum(axis=1).astype(mx.int32)
    vectors = []
    for mode in modes:
        if mode == "cls":
            vectors.append(hidden[:, 0])
        elif mode == "mean":
            vectors.append((hidden * weights).sum(axis=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            vectors.append((hidden * weights).sum(axis=1) / mx.sqrt(counts))
        elif mode == "max":
            vectors.append(mx.where(weights > 0, hidden, -mx.inf).max(axis=1))
        elif mode == "weightedmean":
            position = mx.arange(1, hidden.shape[1] + 1, dtype=mx.float32)[None, :, None] * weights
            vectors.append((hidden * position).sum(axis=1) / mx.maximum(position.sum(axis=1), 1e-9))
        elif mode == "lasttoken":
            vectors.append(hidden[mx.arange(hidden.shape[0]), lengths - 1])
        else:
            raise StartupError(f"MLX backend: pooling mode {mode!r} is not implemented; use BACKEND=torch")
    return mx.concatenate(vectors, axis=-1) if len(vectors) > 1 else vectors[0]


@dataclass(frozen=True, slots=True)
class MlxDense:
    """A sentence-transformers Dense module: ``activation(x @ W.T + b)`` on the pooled vector."""

    weight: mx.array
    bias: mx.array | None
    activation: Activation

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: mx.array) -> mx.array:
        out = x @ self.weight.T
        return self.activation(out if self.bias is None else out + self.bias)


def load_dense(layer: DenseLayer) -> MlxDense:
    """The Dense module ``source.read_layout`` described, with its weights from its folder."""
    weights_file = layer.path / "model.safetensors"
    if not weights_file.is_file():
        raise StartupError(
            f"MLX backend: {weights_file} is missing (only safetensors weights load); use BACKEND=torch"
        )
    tensors = {key: value.astype(mx.float32) for key, value in mx.load(str(weights_file)).items()}  # type: ignore[union-attr]
    weight = tensors.get("linear.weight")
    if weight is None or tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise StartupError(
            f"MLX backend: {weights_file} has no linear.weight of {layer.out_features}x{layer.in_features}"
        )
    if layer.activation not in DENSE_FUNCTIONS:
        raise StartupError(
            f"MLX backend: Dense activation {layer.activation!r} is not implemented; use BACKEND=torch"
        )
    return MlxDense(
        weight, tensors.get("linear.bias") if layer.bias else None, DENSE_FUNCTIONS[layer.activation]
    )
