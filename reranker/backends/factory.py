"""Build the backend that ``selection.choose`` picks, and say why it was picked.

Model runtimes are imported inside the functions, so importing this module
(and everything above it) stays free of torch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reranker.backends.base import Backend
from reranker.backends.selection import Choice, Machine, choose, probe_machine
from reranker.backends.source import ModelSource, resolve_model_source
from reranker.errors import StartupError
from reranker.settings import Settings

if TYPE_CHECKING:
    from reranker.backends.onnx_backend import OnnxBackend

log = logging.getLogger(__name__)


def preflight(settings: Settings) -> ModelSource:
    """The cheap checks that fail fast: where the model is and what kind it is."""
    return resolve_model_source(settings)


def create_backend(
    settings: Settings, source: ModelSource | None = None, machine: Machine | None = None
) -> Backend:
    """Load the model (heavy: call it off the event loop)."""
    source = source or preflight(settings)
    choice = choose(settings, machine or probe_machine())
    log.info(
        "backend %s on %s for %s (%s): %s",
        choice.backend,
        choice.device,
        source.name,
        source.kind.value,
        choice.reason,
    )
    backend, choice = _load(choice, settings, source)
    backend.selection = choice.reason
    return backend


def _load(choice: Choice, settings: Settings, source: ModelSource) -> tuple[Backend, Choice]:
    """The backend of ``choice``, or torch and the amended choice when an automatic ONNX failed."""
    if choice.backend == "onnx":
        backend, problem = _try_onnx(choice, settings, source)
        if backend is not None:
            return backend, choice
        log.warning("%s: falling back to torch on cpu", problem)
        choice = replace(
            choice, backend="torch", quantize="none", reason=f"{choice.reason}; {problem}: torch"
        )
    if choice.backend == "mlx":
        return _mlx_backend(source), choice
    from reranker.backends.torch_backend import TorchBackend

    return TorchBackend(source, choice.device), choice


def onnx_cache_dir(settings: Settings) -> Path:
    if settings.onnx_cache_dir:
        return Path(settings.onnx_cache_dir)
    return Path.home() / ".cache" / "reranker" / "onnx"


def _try_onnx(choice: Choice, settings: Settings, source: ModelSource) -> tuple[Backend | None, str]:
    """ONNX as chosen, or (None, the problem) when BACKEND=auto chose it and the model does not
    export or does not agree with torch. An explicit BACKEND=onnx raises instead of falling back."""
    try:
        backend = _onnx_backend(choice, settings, source)
    except Exception as exc:  # any export failure of an automatic choice falls back
        if not choice.automatic:
            raise
        return None, f"ONNX export failed ({type(exc).__name__}: {exc})"
    if backend.agrees:
        return backend, ""
    problem = f"ONNX {choice.quantize} disagrees with torch ({backend.agreement})"
    if choice.automatic:
        return None, problem
    log.warning("%s; serving it anyway because BACKEND=onnx was asked for", problem)
    return backend, ""


def _onnx_backend(choice: Choice, settings: Settings, source: ModelSource) -> OnnxBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise StartupError("BACKEND=onnx needs onnxruntime: pip install onnxruntime onnx") from None
    from reranker.backends.onnx_backend import OnnxBackend

    return OnnxBackend(source, onnx_cache_dir(settings), choice.quantize, choice.device)


def _mlx_backend(source: ModelSource) -> Backend:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        raise StartupError(
            'BACKEND=mlx needs mlx: pip install mlx (Apple Silicon) or pip install "mlx[cpu]" (Linux)'
        ) from None
    from reranker.backends.mlx_backend import MlxBackend

    return MlxBackend(source)
