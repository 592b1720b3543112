"""Which models one server serves: ``MODELS``, ``MODELS_FILE``, or ``MODEL_NAME`` alone.

``MODELS=embed=/models/bge-small,rerank=BAAI/bge-reranker-base``: a comma-separated list of
``NAME=SOURCE`` or a bare ``SOURCE`` (a hub id or a local path; the served name is then the
model's own). ``MODELS_FILE`` (YAML or JSON) is a list of objects, one per model, with the
per-model settings of ``MODEL_KEYS``. Every model gets a ``Settings`` of its own: the server's,
with its own source and overrides. A bad entry is one ``StartupError`` line naming each problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reranker.errors import StartupError
from reranker.settings import Settings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")  # a path segment: /models/{name}/...
# MODELS_FILE key -> the Settings field it sets for that model.
MODEL_KEYS = {
    "name": None,
    "source": "model_name",
    "kind": "model_kind",
    "task": "model_task",
    "backend": "backend",
    "dtype": "dtype",
    "batch_size": "batch_size",
    "max_length": "max_model_length",
    "default_prompt_name": "default_prompt_name",
    "onnx_quantize": "onnx_quantize",
    "trust_remote_code": "trust_remote_code",
    "rerank_window_tokens": "rerank_window_tokens",
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model to serve: its name (None: the model's own, known once loaded) and settings."""

    name: str | None
    settings: Settings

    @property
    def label(self) -> str:
        """How start-up messages name it before it is loaded."""
        return self.name or self.settings.model_source


def model_specs(settings: Settings) -> list[ModelSpec]:
    """The models the settings ask for, in order (the first able to serve a route is its default)."""
    if settings.models_file:
        specs = _from_file(settings, Path(settings.models_file))
    elif settings.models:
        specs = _from_list(settings, settings.models)
    else:
        return [ModelSpec(None, settings)]
    names = [spec.name for spec in specs if spec.name]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StartupError(f"invalid configuration: models share a name: {', '.join(repeated)}")
    return specs


def _from_list(settings: Settings, text: str) -> list[ModelSpec]:
    entries = [entry.strip() for entry in text.split(",")]
    problems, specs = [], []
    for position, entry in enumerate(entries):
        name, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
        name, source = name.strip(), source.strip()
        where = f"MODELS entry {position} ({entry!r})"
        if not source:
            problems.append(f"{where}: no model source")
        elif "=" in entry and not NAME_PATTERN.match(name):
            problems.append(f"{where}: the name must be letters, digits, '_', '.', ':' or '-'")
        else:
            specs.append(ModelSpec(name or None, _for_model(settings, {"model_name": source})))
    if problems:
        raise StartupError("invalid configuration: " + "; ".join(problems))
    return specs


def _from_file(settings: Settings, path: Path) -> list[ModelSpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"invalid configuration: MODELS_FILE={str(path)!r}: {exc.strerror}") from None
    try:
        entries = json.loads(text) if path.suffix.lower() == ".json" else _yaml(text)
    except ValueError as exc:
        raise StartupError(f"invalid configuration: MODELS_FILE={str(path)!r}: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise StartupError(
            f"invalid configuration: MODELS_FILE={str(path)!r}: expected a non-empty list of models"
        )
    problems, specs = [], []
    for position, entry in enumerate(entries):
        where = f"MODELS_FILE entry {position}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object with 'source' (and 'name', ...)")
            continue
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown}; known: {sorted(MODEL_KEYS)}")
            continue
        if not isinstance(entry.get("source"), str) or not entry["source"].strip():
            problems.append(f"{where}: 'source' (a hub id or a local path) is required")
            continue
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not NAME_PATTERN.match(name)):
            problems.append(f"{where}: 'name' must be letters, digits, '_', '.', ':' or '-'")
            continue
        overrides = {MODEL_KEYS[key]: value for key, value in entry.items() if MODEL_KEYS[key]}
        try:
            specs.append(ModelSpec(name, _for_model(settings, overrides)))
        except StartupError as exc:
            problems.append(f"{where} ({name or entry['source']}): {exc.message}")
    if problems:
        raise StartupError("invalid configuration: " + "; ".join(problems))
    return specs


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None


def _for_model(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """The server's settings with this model's source and overrides, validated as a whole."""
    values = settings.model_dump(exclude_unset=True, exclude={"models", "models_file", "local_model_path"})
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        fields = {"model_name": "source", "model_kind": "kind", "max_model_length": "max_length"}
        problems = [
            f"{fields.get(str(err['loc'][0]), str(err['loc'][0]))}={values.get(str(err['loc'][0]))!r}: "
            f"{err['msg']}"
            for err in exc.errors()
        ]
        raise StartupError("; ".join(problems)) from None
