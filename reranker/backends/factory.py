"""Build the backend that ``selection.choose`` picks, and say why it was picked.

An explicit ONNX int8 backend whose answers on the probe texts are further from torch
fp32's than ONNX_INT8_MIN_AGREEMENT allows is a start-up error naming the figure.

Model runtimes are imported inside the functions, so importing this module
(and everything above it) stays free of torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from reranker.backends.base import Backend
from reranker.backends.mlx_families import mlx_refusal
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
    machine = machine or probe_machine()
    choice = choose(settings, machine, mlx_refusal(source))
    log.info(
        "backend %s on %s for %s (%s): %s",
        choice.backend,
        choice.device,
        source.name,
        source.kind.value,
        choice.reason,
    )
    if choice.backend == "onnx":
        backend: Backend = _onnx_backend(choice, settings, source, machine)
    elif choice.backend == "mlx":
        backend = _mlx_backend(source)
    else:
        from reranker.backends.torch_backend import TorchBackend

        backend = TorchBackend(source, choice.device)
    backend.selection = choice.reason
    return backend


def onnx_cache_dir(settings: Settings) -> Path:
    if settings.onnx_cache_dir:
        return Path(settings.onnx_cache_dir)
    return Path.home() / ".cache" / "reranker" / "onnx"


FP32_MIN_AGREEMENT = 0.9999  # an fp32 file further from torch than this is a broken export


def _onnx_backend(choice: Choice, settings: Settings, source: ModelSource, machine: Machine) -> OnnxBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise StartupError("BACKEND=onnx needs onnxruntime: pip install onnxruntime onnx") from None
    from reranker.backends.onnx_backend import OnnxBackend
    from reranker.backends.onnx_quantize import int8_profile

    int8 = int8_profile(machine.arch, machine.cpu_flags) if choice.quantize == "int8" else None
    backend = OnnxBackend(source, onnx_cache_dir(settings), choice.device, int8)
    measured, floor = backend.agreement, settings.onnx_int8_min_agreement
    if int8 is not None and measured.value < floor:
        raise StartupError(
            f"ONNX int8 agreement with torch fp32 is {measured.value:.6f} ({measured.text}), below "
            f"ONNX_INT8_MIN_AGREEMENT={floor} (int8 here: {int8.why}); serve fp32 with "
            "ONNX_QUANTIZE=none, or lower ONNX_INT8_MIN_AGREEMENT to accept it"
        )
    if int8 is None and measured.value < FP32_MIN_AGREEMENT:
        log.warning(
            "ONNX fp32 disagrees with torch (%s); served because BACKEND=onnx asks for it", measured.text
        )
    log.info("ONNX %s against torch fp32: %s", "int8" if int8 else "fp32", measured.text)
    return backend


def _mlx_backend(source: ModelSource) -> Backend:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        raise StartupError(
            'BACKEND=mlx needs mlx: pip install mlx (Apple Silicon) or pip install "mlx[cpu]" (Linux)'
        ) from None
    from reranker.backends.mlx_backend import MlxBackend

    return MlxBackend(source)
