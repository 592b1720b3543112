"""Which backend serves the model, in which precision, and why: a pure decision over what
the machine offers.

``BACKEND=auto`` (the default) picks torch on CUDA, MLX on Apple Silicon (for the model
families it serves; torch otherwise, saying why), torch on MPS, and on a CPU-only machine
torch, or ONNX Runtime float32 when the CPU has no native half precision. ``DTYPE=auto``
(the default) picks the hardware's native half precision: bfloat16 on a CPU with AMX
(``amx_bf16``) and on CUDA devices of compute capability 8.0 or newer, float16 on older
CUDA devices, on MPS and on Apple Silicon MLX; float32 everywhere else. Where float32 runs
on a CPU, ``auto`` offers ONNX Runtime (measured 1.25-1.39x torch on 2 cores, and exact):
the factory keeps it only if its answers at load are within 1e-5 of torch's
(``Choice.onnx_if_exact``), and serves torch otherwise, saying why. ONNX int8 is served
only when asked for (``BACKEND=onnx ONNX_QUANTIZE=int8``). Half precision is checked
against float32 at start-up by the factory (``precision.py``). The machine is probed once
(``probe_machine``); ``choose`` only reads that probe, so every branch is testable on any
machine.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, replace
from pathlib import Path

from reranker.errors import StartupError
from reranker.settings import Settings

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class Machine:
    """What this machine can run, as far as the installed packages and the CPU can tell."""

    cuda: bool
    mps: bool
    apple_silicon: bool
    mlx: bool
    arch: str  # platform.machine(): x86_64, aarch64, arm64, ...
    cpu_flags: frozenset[str]  # /proc/cpuinfo "flags" (x86) or "Features" (ARM); empty elsewhere
    cuda_capability: tuple[int, int] | None = None  # of CUDA device 0: (8, 0) is an A100
    onnxruntime: bool = True  # part of the base install (requirements.txt)


@dataclass(frozen=True, slots=True)
class Choice:
    backend: str  # torch | onnx | mlx
    device: str  # cuda | mps | cpu (onnx: where onnxruntime should run)
    quantize: str  # none | int8 (onnx only)
    reason: str  # one line for the log and /health
    dtype: str = "float32"  # float32 | bfloat16 | float16
    dtype_asked: bool = False  # DTYPE was set: below the half-precision floor is an error, not a fallback
    onnx_if_exact: bool = False  # auto on a float32 CPU: ONNX Runtime if within 1e-5 of torch, else torch


def probe_machine() -> Machine:
    """Import-light probe: torch only for its device checks, mlx by its spec, the CPU by its flags."""
    import torch

    mps_backend = getattr(torch.backends, "mps", None)
    cuda = torch.cuda.is_available()
    return Machine(
        cuda=cuda,
        mps=bool(mps_backend) and torch.backends.mps.is_available(),
        apple_silicon=platform.system() == "Darwin" and platform.machine() == "arm64",
        mlx=importlib.util.find_spec("mlx") is not None,
        arch=platform.machine(),
        cpu_flags=read_cpu_flags(CPUINFO),
        cuda_capability=tuple(torch.cuda.get_device_capability(0)) if cuda else None,  # type: ignore[arg-type]
        onnxruntime=importlib.util.find_spec("onnxruntime") is not None,
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
    """The backend and precision for this machine; ``mlx_refusal`` (mlx_families.mlx_refusal of
    the model) is why MLX cannot serve the loaded model, so that auto never picks it then."""
    return _with_dtype(settings, machine, _backend(settings, machine, mlx_refusal))


def _backend(settings: Settings, machine: Machine, mlx_refusal: str | None) -> Choice:
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
        return Choice("torch", device, "none", f"auto: Apple Silicon, but {mlx_refusal}: on {device}")
    if preference == "mps":
        return Choice("torch", "mps", "none", "auto: DEVICE_PREFERENCE=mps: torch on the Apple GPU (MPS)")
    if machine.mps and preference == "auto":
        return Choice("torch", "mps", "none", "auto: Apple GPU (MPS) available, mlx is not installed")
    if preference == "cpu" and (machine.cuda or machine.mps):
        return Choice("torch", "cpu", "none", "auto: DEVICE_PREFERENCE=cpu: on the CPU")
    return Choice("torch", "cpu", "none", "auto: CPU only")


CUDA_BF16_CAPABILITY = (8, 0)  # Ampere and newer compute bfloat16 natively


def _with_dtype(settings: Settings, machine: Machine, choice: Choice) -> Choice:
    """``choice`` with its precision, the reason for it, and whether ONNX float32 is offered."""
    asked = settings.dtype != "auto"
    dtype, why = (settings.dtype, f"DTYPE={settings.dtype}") if asked else _native(choice, machine)
    if choice.backend == "onnx" and dtype != "float32":
        raise StartupError(
            f"DTYPE={dtype}: BACKEND=onnx runs float32 (or ONNX_QUANTIZE=int8) only; "
            "use BACKEND=torch for half precision, or DTYPE=float32"
        )
    reason = choice.reason if choice.backend == "onnx" else f"{choice.reason}; {why}"  # ONNX_QUANTIZE says
    offer_onnx = (
        settings.backend == "auto"
        and choice.backend == "torch"
        and choice.device == "cpu"
        and dtype == "float32"
    )
    if offer_onnx and not machine.onnxruntime:
        reason += "; torch (onnxruntime is not installed)"
    elif offer_onnx:
        onnx = replace(choice, backend="onnx", onnx_if_exact=True)
        return replace(onnx, reason=reason, dtype=dtype, dtype_asked=asked)
    return replace(choice, reason=reason, dtype=dtype, dtype_asked=asked)


def _native(choice: Choice, machine: Machine) -> tuple[str, str]:
    """DTYPE=auto: the hardware's native half precision, else float32; with the reason."""
    if choice.backend == "onnx":
        return "float32", ""
    if choice.backend == "mlx":
        if machine.apple_silicon:
            return "float16", "float16 (Apple Silicon MLX)"
        return "float32", "float32 (MLX on a CPU without native half precision)"
    if choice.device == "cuda":
        capability = machine.cuda_capability or (0, 0)
        shown = ".".join(map(str, capability))
        if capability >= CUDA_BF16_CAPABILITY:
            return "bfloat16", f"bfloat16 (CUDA compute capability {shown} >= 8.0)"
        return "float16", f"float16 (CUDA compute capability {shown} < 8.0: no native bfloat16)"
    if choice.device == "mps":
        return "float16", "float16 (Apple GPU)"
    if "amx_bf16" in machine.cpu_flags:
        return "bfloat16", "bfloat16 (CPU with AMX: amx_bf16)"
    return "float32", "float32 (no native half precision on this CPU: no amx_bf16)"


def _torch_device(preference: str, machine: Machine) -> str:
    if preference == "auto":
        return "cuda" if machine.cuda else "mps" if machine.mps else "cpu"
    if preference == "cuda" and not machine.cuda:
        raise StartupError("DEVICE_PREFERENCE=cuda but torch sees no CUDA device")
    if preference == "mps" and not machine.mps:
        raise StartupError("DEVICE_PREFERENCE=mps but torch has no MPS (Apple GPU) support here")
    return preference
