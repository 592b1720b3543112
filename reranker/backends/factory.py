"""Pick and build the backend the settings ask for.

Model runtimes are imported inside the functions, so importing this module
(and everything above it) stays free of torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from reranker.backends.base import Backend
from reranker.backends.source import ModelSource, resolve_model_source
from reranker.errors import StartupError
from reranker.settings import Settings

log = logging.getLogger(__name__)


def preflight(settings: Settings) -> ModelSource:
    """The cheap checks that fail fast: where the model is and what kind it is."""
    return resolve_model_source(settings)


def create_backend(settings: Settings, source: ModelSource | None = None) -> Backend:
    """Load the model (heavy: call it off the event loop)."""
    source = source or preflight(settings)
    if settings.backend == "mlx" or (settings.use_mlx and settings.backend == "auto"):
        return _mlx_backend(source)
    if settings.backend == "onnx":
        return _onnx_backend(settings, source)
    from reranker.backends.torch_backend import TorchBackend, choose_device

    device = choose_device(settings.device_preference)
    log.info("loading %s (%s) with torch on %s", source.name, source.kind.value, device)
    return TorchBackend(source, device)


def onnx_cache_dir(settings: Settings) -> Path:
    if settings.onnx_cache_dir:
        return Path(settings.onnx_cache_dir)
    return Path.home() / ".cache" / "reranker" / "onnx"


def _onnx_backend(settings: Settings, source: ModelSource) -> Backend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise StartupError("BACKEND=onnx needs onnxruntime: pip install onnxruntime onnx") from None
    from reranker.backends.onnx_backend import OnnxBackend

    quantize = settings.onnx_quantize
    log.info("loading %s (%s) with onnxruntime (%s)", source.name, source.kind.value, quantize)
    return OnnxBackend(source, onnx_cache_dir(settings), quantize, settings.device_preference)


def _mlx_backend(source: ModelSource) -> Backend:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        raise StartupError(
            'BACKEND=mlx needs mlx: pip install mlx (Apple Silicon) or pip install "mlx[cpu]" (Linux)'
        ) from None
    from reranker.backends.mlx_backend import MlxBackend

    log.info("loading %s (%s) with MLX", source.name, source.kind.value)
    return MlxBackend(source)
