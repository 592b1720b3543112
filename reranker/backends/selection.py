"""Which backend serves the model, and why: a pure decision over what the machine offers.

``BACKEND=auto`` (the default) only picks backends whose answers equal
sentence-transformers' (to 1e-5) whatever the batch holds: torch on CUDA, MLX on Apple
Silicon (for the model families it serves; torch otherwise, saying why), torch on MPS, and
torch on a CPU-only machine. ONNX Runtime is served only when
asked for (``BACKEND=onnx``), and int8 only with ``ONNX_QUANTIZE=int8``: quantized
answers differ from the model's. The machine is probed once (``probe_machine``);
``choose`` only reads that probe, so every branch is testable on any machine.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from reranker.errors import StartupError
from reranker.settings import Settings

CPUINFO = Path("/proc/cpuinfo")
INT8_OPT_IN = "ONNX int8 is opt-in: BACKEND=onnx ONNX_QUANTIZE=int8"


@dataclass(frozen=True, slots=True)
class Machine:
    """What this machine can run, as far as the installed packages and the CPU can tell."""

    cuda: bool
    mps: bool
    apple_silicon: bool
    mlx: bool
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    cpu_flags: frozenset[str]  # /proc/cpuinfo "flags" (x86) or "Features" (ARM); empty elsewhere


@dataclass(frozen=True, slots=True)
class Choice:
    backend: str  # torch | onnx | mlx
    device: str  # cuda | mps | cpu (onnx: where onnxruntime should run)
    quantize: str  # none | int8 (onnx only)
    reason: str  # one line for the log and /health


def probe_machine() -> Machine:
    """Import-light probe: torch only for its device checks, mlx by its spec, the CPU by its flags."""
    import torch

    mps_backend = getattr(torch.backends, "mps", None)
    return Machine(
        cuda=torch.cuda.is_available(),
        mps=bool(mps_backend) and torch.backends.mps.is_available(),
        apple_silicon=platform.system() == "Darwin" and platform.machine() == "arm64",
        mlx=importlib.util.find_spec("mlx") is not None,
        arch=platform.machine(),
        cpu_flags=read_cpu_flags(CPUINFO),
    )


def read_cpu_flags(cpuinfo: Path) -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo``; empty when there is none (macOS)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose(settings: Settings, machine: Machine, mlx_refusal: str | None = None) -> Choice:
    """The backend for this machine; ``mlx_refusal`` (mlx_families.mlx_refusal of the model) is
    why MLX cannot serve the loaded model, so that auto never picks it then."""
    preference = settings.device_preference
    if settings.backend == "torch":
        return Choice("torch", _torch_device(preference, machine), "none", "BACKEND=torch")
    if settings.backend == "mlx":
        return Choice("mlx", "mlx", "none", "BACKEND=mlx")
    if settings.backend == "onnx":
        device = "cuda" if machine.cuda and preference in ("auto", "cuda") else "cpu"
        quantize = settings.onnx_quantize
        reason = "BACKEND=onnx" + (" ONNX_QUANTIZE=int8" if quantize == "int8" else "")
        return Choice("onnx", device, quantize, reason)
    return _automatic(settings, machine, mlx_refusal)


def _automatic(settings: Settings, machine: Machine, mlx_refusal: str | None) -> Choice:
    preference = settings.device_preference
    if settings.use_mlx:
        return Choice("mlx", "mlx", "none", "USE_MLX=true")
    if machine.cuda and preference in ("auto", "cuda"):
        return Choice("torch", "cuda", "none", "auto: a CUDA GPU is available, torch runs on it")
    _torch_device(preference, machine)  # an explicit device the machine lacks is an error here too
    if preference == "auto" and machine.apple_silicon and machine.mlx:
        if mlx_refusal is None:
            return Choice("mlx", "mlx", "none", "auto: Apple Silicon with mlx installed")
        device = "mps" if machine.mps else "cpu"
        return Choice("torch", device, "none", f"auto: Apple Silicon, but {mlx_refusal}: torch on {device}")
    if machine.mps and preference in ("auto", "mps"):
        return Choice("torch", "mps", "none", "auto: Apple GPU (MPS) available, mlx is not installed")
    return Choice("torch", "cpu", "none", f"auto: CPU only: torch fp32, exact ({INT8_OPT_IN})")


def _torch_device(preference: str, machine: Machine) -> str:
    if preference == "auto":
        return "cuda" if machine.cuda else "mps" if machine.mps else "cpu"
    if preference == "cuda" and not machine.cuda:
        raise StartupError("DEVICE_PREFERENCE=cuda but torch sees no CUDA device")
    if preference == "mps" and not machine.mps:
        raise StartupError("DEVICE_PREFERENCE=mps but torch has no MPS (Apple GPU) support here")
    return preference
