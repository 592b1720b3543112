"""Which backend serves the model, and why: a pure decision over what the machine offers.

``BACKEND=auto`` (the default) chooses, in order: torch on CUDA, MLX on Apple Silicon,
torch on MPS, and on a CPU-only machine ONNX Runtime with int8 weights when
onnxruntime is installed (about twice torch's fp32 throughput), else torch. The
machine is probed once (``probe_machine``); ``choose`` only reads that probe, so
every branch is testable on any machine.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass

from reranker.errors import StartupError
from reranker.settings import Settings


@dataclass(frozen=True, slots=True)
class Machine:
    """What this machine can run, as far as the installed packages can tell."""

    cuda: bool
    mps: bool
    apple_silicon: bool
    mlx: bool
    onnxruntime: bool


@dataclass(frozen=True, slots=True)
class Choice:
    backend: str  # torch | onnx | mlx
    device: str  # cuda | mps | cpu (onnx: where onnxruntime should run)
    quantize: str  # none | int8 (onnx only)
    reason: str  # one line for the log and /health
    automatic: bool  # chosen by BACKEND=auto: a failed ONNX export may fall back to torch


def probe_machine() -> Machine:
    """Import-light probe: torch only for its device checks, the others by their spec."""
    import torch

    mps_backend = getattr(torch.backends, "mps", None)
    return Machine(
        cuda=torch.cuda.is_available(),
        mps=bool(mps_backend) and torch.backends.mps.is_available(),
        apple_silicon=platform.system() == "Darwin" and platform.machine() == "arm64",
        mlx=importlib.util.find_spec("mlx") is not None,
        onnxruntime=importlib.util.find_spec("onnxruntime") is not None,
    )


def choose(settings: Settings, machine: Machine) -> Choice:
    preference = settings.device_preference
    if settings.backend == "torch":
        return Choice("torch", _torch_device(preference, machine), "none", "BACKEND=torch", False)
    if settings.backend == "mlx":
        return Choice("mlx", "mlx", "none", "BACKEND=mlx", False)
    if settings.backend == "onnx":
        device = "cuda" if machine.cuda and preference in ("auto", "cuda") else "cpu"
        return Choice("onnx", device, _quantize(settings, device), "BACKEND=onnx", False)
    return _automatic(settings, machine)


def _automatic(settings: Settings, machine: Machine) -> Choice:
    preference = settings.device_preference
    if settings.use_mlx:
        return Choice("mlx", "mlx", "none", "USE_MLX=true", True)
    if machine.cuda and preference in ("auto", "cuda"):
        return Choice("torch", "cuda", "none", "auto: a CUDA GPU is available, torch runs on it", True)
    _torch_device(preference, machine)  # an explicit device the machine lacks is an error here too
    if preference == "auto" and machine.apple_silicon and machine.mlx:
        return Choice("mlx", "mlx", "none", "auto: Apple Silicon with mlx installed", True)
    if machine.mps and preference in ("auto", "mps"):
        return Choice("torch", "mps", "none", "auto: Apple GPU (MPS) available, mlx is not installed", True)
    if machine.onnxruntime:
        quantize = _quantize(settings, "cpu")
        return Choice(
            "onnx", "cpu", quantize, f"auto: CPU only, onnxruntime installed: ONNX {quantize}", True
        )
    return Choice("torch", "cpu", "none", "auto: CPU only and onnxruntime is not installed: torch", True)


def _torch_device(preference: str, machine: Machine) -> str:
    if preference == "auto":
        return "cuda" if machine.cuda else "mps" if machine.mps else "cpu"
    if preference == "cuda" and not machine.cuda:
        raise StartupError("DEVICE_PREFERENCE=cuda but torch sees no CUDA device")
    if preference == "mps" and not machine.mps:
        raise StartupError("DEVICE_PREFERENCE=mps but torch has no MPS (Apple GPU) support here")
    return preference


def _quantize(settings: Settings, device: str) -> str:
    """ONNX_QUANTIZE=auto: int8 weights on CPU (where the speed comes from), fp32 on a GPU."""
    if settings.onnx_quantize != "auto":
        return settings.onnx_quantize
    return "int8" if device == "cpu" else "none"
