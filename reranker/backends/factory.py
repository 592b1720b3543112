"""Build the backend that ``selection.choose`` picks, and say why it was picked.

An explicit ONNX int8 backend whose answers on the probe texts are further from torch
fp32's than ONNX_INT8_MIN_AGREEMENT allows is a start-up error naming the figure. Half
precision is held to HALF_PRECISION_MIN_AGREEMENT the same way (agreement.py): below it,
``DTYPE=auto`` falls back to float32 and says why, an explicit DTYPE refuses to start.
Where ``auto`` offers ONNX Runtime float32 on a CPU, it serves it only when its answers are
within 1e-5 (agreement.EXACT) of torch float32's, and torch otherwise, saying why.

Model runtimes are imported inside the functions, so importing this module
(and everything above it) stays free of torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reranker.backends.agreement import EXACT, Agreement, half_floor_text, meets_half_floor
from reranker.backends.base import Backend
from reranker.backends.mlx_families import mlx_refusal
from reranker.backends.selection import Choice, Machine, choose, probe_machine
from reranker.backends.source import ModelSource, resolve_model_source
from reranker.errors import StartupError
from reranker.settings import Settings

if TYPE_CHECKING:
    from reranker.backends.onnx_backend import OnnxBackend
    from reranker.backends.torch_backend import TorchBackend

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
    if choice.onnx_if_exact:
        backend, reason = _fastest_float32(choice, settings, source, machine)
    elif choice.backend == "onnx":
        backend, reason = _onnx_backend(choice, settings, source, machine), choice.reason
    elif choice.backend == "mlx":
        backend, reason = _with_floor(choice, settings, lambda dtype: _mlx_backend(source, dtype))
    else:
        device = choice.device
        backend, reason = _with_floor(choice, settings, lambda dtype: _torch_backend(source, device, dtype))
    backend.selection = reason
    info = backend.info()
    log.info(
        "serving %s (%s) with %s on %s in %s: %s", source.name, source.kind.value, info.backend,
        info.device, info.dtype, reason,
    )  # fmt: skip
    return backend


def _torch_backend(source: ModelSource, device: str, dtype: str) -> TorchBackend:
    from reranker.backends.torch_backend import TorchBackend

    return TorchBackend(source, device, dtype)


def half_precision_verdict(choice: Choice, agreement: Agreement, floor: float) -> str | None:
    """None when the half-precision model may serve; else why it may not. An explicit DTYPE
    below the floor is a StartupError naming the figure and the variable."""
    if meets_half_floor(agreement, floor):
        return None
    why = (
        f"{choice.dtype} against float32: {agreement.text}, short of HALF_PRECISION_MIN_AGREEMENT={floor} "
        f"({half_floor_text(agreement.kind, floor)})"
    )
    if choice.dtype_asked:
        raise StartupError(
            f"DTYPE={choice.dtype}: {why}; serve DTYPE=float32, or lower HALF_PRECISION_MIN_AGREEMENT "
            "to accept it"
        )
    return why


def _with_floor(choice: Choice, settings: Settings, build: Callable[[str], Backend]) -> tuple[Backend, str]:
    """The backend in ``choice.dtype``, held to the half-precision floor (float32 is never checked)."""
    backend = build(choice.dtype)
    agreement: Agreement | None = getattr(backend, "half_agreement", None)
    if choice.dtype == "float32" or agreement is None:
        return backend, choice.reason
    refusal = half_precision_verdict(choice, agreement, settings.half_precision_min_agreement)
    if refusal is None:
        return backend, f"{choice.reason}, {agreement.text} from float32"
    log.warning("%s: serving float32 instead", refusal)
    del backend
    return build("float32"), f"{choice.reason}, but {refusal}: float32 instead"


def onnx_is_exact(agreement: Agreement) -> bool:
    """Whether ONNX Runtime float32's answers are close enough to torch's for BACKEND=auto."""
    return agreement.largest <= EXACT


def _fastest_float32(
    choice: Choice, settings: Settings, source: ModelSource, machine: Machine
) -> tuple[Backend, str]:
    """BACKEND=auto on a float32 CPU: ONNX Runtime when it agrees with torch within 1e-5, else torch."""
    torch_backend = _torch_backend(source, "cpu", "float32")
    try:
        onnx = _onnx_backend(replace(choice, device="cpu"), settings, source, machine, torch_backend)
    except Exception as exc:  # noqa: BLE001 - an export that fails leaves torch serving, saying why
        log.warning("ONNX Runtime could not run %s (%s): torch serves it", source.name, exc)
        failed = type(exc).__name__
        return torch_backend, f"{choice.reason}; torch: ONNX Runtime could not run this model ({failed})"
    measured = onnx.agreement
    if onnx_is_exact(measured):
        within = f"largest difference {measured.largest:.1e} over the probes"
        return onnx, f"{choice.reason}; ONNX Runtime: within {EXACT:g} of torch ({within})"
    log.warning("ONNX Runtime float32 differs from torch (%s): torch serves %s", measured.text, source.name)
    return torch_backend, (
        f"{choice.reason}; torch: ONNX Runtime differs from it by {measured.largest:.2e}, over {EXACT:g}"
    )


def onnx_cache_dir(settings: Settings) -> Path:
    if settings.onnx_cache_dir:
        return Path(settings.onnx_cache_dir)
    return Path.home() / ".cache" / "reranker" / "onnx"


FP32_MIN_AGREEMENT = 0.9999  # an fp32 file further from torch than this is a broken export


def _onnx_backend(
    choice: Choice,
    settings: Settings,
    source: ModelSource,
    machine: Machine,
    reference: TorchBackend | None = None,
) -> OnnxBackend:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise StartupError("BACKEND=onnx needs onnxruntime: pip install -r requirements.txt") from None
    from reranker.backends.onnx_backend import OnnxBackend
    from reranker.backends.onnx_quantize import int8_profile

    int8 = int8_profile(machine.arch, machine.cpu_flags) if choice.quantize == "int8" else None
    backend = OnnxBackend(source, onnx_cache_dir(settings), choice.device, int8, reference)
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


def _mlx_backend(source: ModelSource, dtype: str = "float32") -> Backend:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        raise StartupError(
            'BACKEND=mlx needs mlx: pip install mlx (Apple Silicon) or pip install "mlx[cpu]" (Linux)'
        ) from None
    from reranker.backends.mlx_backend import MlxBackend

    return MlxBackend(source, dtype)
