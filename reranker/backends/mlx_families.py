"""Which models the MLX backend serves, decided from the model's files alone (no mlx import).

``BACKEND=auto`` asks ``mlx_refusal`` before it picks MLX (and picks torch, saying why, when
MLX cannot serve the model); the MLX backend asks it before it loads anything, so a model
it cannot serve is a start-up error naming the family and the backend to use, never half-run.
"""

from __future__ import annotations

from pathlib import Path

from reranker.backends.source import ModelSource, read_json
from reranker.kinds import kind_of

ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "modernbert")
DECODER_FAMILIES = ("qwen2", "qwen3")  # through mlx-lm's model implementations
SERVED = ", ".join(ENCODER_FAMILIES + DECODER_FAMILIES)
BI_ENCODER_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")  # read by source.read_layout
CROSS_ENCODER_MODULES = ("Transformer", "LogitScore")
DENSE_ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "silu", "sigmoid")
# transformers' activation names the encoders implement (mlx_layers.ACTIVATIONS), and the config
# keys that name them per family
ENCODER_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")
ACTIVATION_KEYS = ("hidden_act", "activation", "hidden_activation", "classifier_activation")
INSTEAD = "use BACKEND=torch (or BACKEND=onnx)"


def mlx_refusal(source: ModelSource) -> str | None:
    """Why the MLX backend cannot serve this model (a clause naming the family; ``INSTEAD`` says
    what to use), or None when it can."""
    kind = kind_of(source.kind)
    if not kind.on_mlx:
        return f"MLX backend does not serve {source.kind.value} models"
    layout = source.layout
    family = layout.family or "unknown"
    config = read_json(Path(source.path) / "config.json")
    if family not in ENCODER_FAMILIES + DECODER_FAMILIES:
        return f"MLX backend cannot serve {family!r} models (it serves {SERVED})"
    if config.get("quantization") or config.get("quantization_config"):
        return f"MLX backend serves float32 checkpoints only; this {family} model is quantized"
    for key in ACTIVATION_KEYS if family in ENCODER_FAMILIES else ():
        if key in config and config[key] not in ENCODER_ACTIVATIONS:
            return f"MLX backend does not implement the {family} activation {key}={config[key]!r}"
    if family in DECODER_FAMILIES and config.get("use_sliding_window"):
        return f"MLX backend does not run {family} sliding-window attention (use_sliding_window: true)"
    if not any(Path(source.path).glob("model*.safetensors")):
        return f"MLX backend loads safetensors weights only and this {family} model has none"
    allowed = CROSS_ENCODER_MODULES if kind.one_score else BI_ENCODER_MODULES
    for module in layout.module_types:
        if module not in allowed:
            return (
                f"MLX backend cannot run the sentence-transformers module {module!r} of this {family} "
                f"{source.kind.value} (it runs {', '.join(allowed)})"
            )
    if not layout.pooling_includes_prompt:
        return "MLX backend cannot pool without the prompt tokens (include_prompt: false)"
    if any(dense.activation not in DENSE_ACTIVATIONS for dense in layout.dense):
        return f"MLX backend runs the Dense activations {', '.join(DENSE_ACTIVATIONS)} only"
    if kind.one_score:
        return _cross_encoder_refusal(layout.architectures, family, layout.causal_lm)
    return None


def _cross_encoder_refusal(architectures: tuple[str, ...], family: str, causal_lm: bool) -> str | None:
    if family in DECODER_FAMILIES:
        if not causal_lm and not any(a.endswith("ForSequenceClassification") for a in architectures):
            return (
                f"MLX backend serves {family} rerankers as sequence classification or as a causal LM "
                f"scored by yes/no, and this one is {', '.join(architectures) or 'neither'}"
            )
        return None
    if causal_lm or not any(a.endswith("ForSequenceClassification") for a in architectures):
        return f"MLX backend serves {family} cross-encoders with their sequence-classification head only"
    return None
