"""BACKEND=auto: the decision on every kind of machine (each one a probe the test makes up),
the CPU probe, and the int8 settings each kind of CPU gets."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from reranker.backends.factory import create_backend
from reranker.backends.onnx_quantize import int8_profile
from reranker.backends.selection import Machine, choose, read_cpu_flags
from reranker.errors import StartupError
from reranker.settings import load_settings
from tests.conftest import make_settings

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}
CPU = Machine(cuda=False, mps=False, apple_silicon=False, mlx=True, arch="x86_64", cpu_flags=AVX2)
CPU_BARE = replace(CPU, mlx=False)
CUDA_BOX = replace(CPU, cuda=True, cpu_flags=AVX512_VNNI)
MAC_MLX = Machine(cuda=False, mps=True, apple_silicon=True, mlx=True, arch="arm64", cpu_flags=frozenset())
MAC_NO_MLX = replace(MAC_MLX, mlx=False)
GRAVITON = Machine(
    cuda=False, mps=False, apple_silicon=False, mlx=False, arch="aarch64", cpu_flags=frozenset({"asimd"})
)
EVERY_MACHINE = [CPU, CPU_BARE, CUDA_BOX, MAC_MLX, MAC_NO_MLX, GRAVITON]
CPU_REASON = "auto: CPU only: torch fp32, exact (ONNX int8 is opt-in: BACKEND=onnx ONNX_QUANTIZE=int8)"


@pytest.mark.parametrize(
    ("machine", "settings", "expected", "reason"),
    [
        (CUDA_BOX, {}, ("torch", "cuda", "none"), "CUDA GPU"),
        (MAC_MLX, {}, ("mlx", "mlx", "none"), "Apple Silicon with mlx"),
        (MAC_NO_MLX, {}, ("torch", "mps", "none"), "MPS"),
        (CPU, {}, ("torch", "cpu", "none"), CPU_REASON),
        (CPU_BARE, {}, ("torch", "cpu", "none"), CPU_REASON),
        (GRAVITON, {}, ("torch", "cpu", "none"), CPU_REASON),
        (CPU, {"onnx_quantize": "int8"}, ("torch", "cpu", "none"), CPU_REASON),
        (CUDA_BOX, {"device_preference": "cpu"}, ("torch", "cpu", "none"), CPU_REASON),
        (MAC_MLX, {"device_preference": "mps"}, ("torch", "mps", "none"), "MPS"),
        (MAC_MLX, {"device_preference": "cpu"}, ("torch", "cpu", "none"), CPU_REASON),
        (CPU, {"use_mlx": True}, ("mlx", "mlx", "none"), "USE_MLX=true"),
        (CUDA_BOX, {"backend": "onnx"}, ("onnx", "cuda", "none"), "BACKEND=onnx"),
        (CPU, {"backend": "onnx"}, ("onnx", "cpu", "none"), "BACKEND=onnx"),
        (CPU, {"backend": "onnx", "onnx_quantize": "int8"}, ("onnx", "cpu", "int8"), "ONNX_QUANTIZE=int8"),
        (CUDA_BOX, {"backend": "torch"}, ("torch", "cuda", "none"), "BACKEND=torch"),
        (CPU, {"backend": "mlx"}, ("mlx", "mlx", "none"), "BACKEND=mlx"),
    ],
)
def test_choice_on_each_kind_of_machine(
    machine: Machine, settings: dict, expected: tuple[str, str, str], reason: str
) -> None:
    choice = choose(make_settings(**{"backend": "auto", **settings}), machine)
    assert (choice.backend, choice.device, choice.quantize) == expected
    assert reason in choice.reason


MLX_CANNOT = "MLX backend cannot serve 'mpnet' models (it serves bert, ...)"


@pytest.mark.parametrize(
    ("machine", "settings", "expected"),
    [
        (MAC_MLX, {}, ("torch", "mps")),
        (replace(MAC_MLX, mps=False), {}, ("torch", "cpu")),
        (MAC_MLX, {"backend": "mlx"}, ("mlx", "mlx")),  # asked for: the backend refuses at start-up
        (CPU, {"use_mlx": True}, ("mlx", "mlx")),
        (CUDA_BOX, {}, ("torch", "cuda")),
    ],
)
def test_auto_never_picks_mlx_for_a_model_it_cannot_serve(
    machine: Machine, settings: dict, expected: tuple[str, str]
) -> None:
    choice = choose(make_settings(**{"backend": "auto", **settings}), machine, mlx_refusal=MLX_CANNOT)
    assert (choice.backend, choice.device) == expected
    if machine.apple_silicon and "backend" not in settings:
        assert choice.reason == f"auto: Apple Silicon, but {MLX_CANNOT}: torch on {expected[1]}"


@pytest.mark.parametrize("machine", EVERY_MACHINE)
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_auto_never_serves_onnx_or_int8(machine: Machine, quantize: str) -> None:
    """Only backends that equal sentence-transformers: whatever is installed, whatever ONNX_QUANTIZE says."""
    choice = choose(make_settings(backend="auto", onnx_quantize=quantize), machine)
    assert choice.backend in ("torch", "mlx") and choice.quantize == "none"


@pytest.mark.parametrize(
    ("machine", "preference", "message"),
    [(CPU, "cuda", "no CUDA device"), (CPU, "mps", "no MPS")],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_an_unavailable_device_preference_is_a_start_up_error(
    machine: Machine, preference: str, message: str, backend: str
) -> None:
    with pytest.raises(StartupError, match=message):
        choose(make_settings(backend=backend, device_preference=preference), machine)


def test_quantization_is_none_unless_asked_for() -> None:
    assert load_settings(environ={}).onnx_quantize == "none"
    assert load_settings(environ={"ONNX_QUANTIZE": "INT8"}).onnx_quantize == "int8"
    with pytest.raises(StartupError, match="ONNX_QUANTIZE='auto'"):
        load_settings(environ={"ONNX_QUANTIZE": "auto"})
    with pytest.raises(StartupError, match=re.escape("ONNX_INT8_MIN_AGREEMENT='1.5'")):
        load_settings(environ={"ONNX_INT8_MIN_AGREEMENT": "1.5"})


@pytest.mark.parametrize(
    ("text", "flags"),
    [
        (
            "processor\t: 0\nflags\t\t: fpu sse avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t: fpu\n",
            "fpu sse avx2 avx512_vnni",
        ),
        ("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n", "fp asimd asimddp"),
        ("processor\t: 0\nmodel name\t: mystery\n", ""),
    ],
)
def test_cpu_flags_come_from_cpuinfo(tmp_path: Path, text: str, flags: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert read_cpu_flags(cpuinfo) == frozenset(flags.split())
    assert read_cpu_flags(tmp_path / "missing") == frozenset()  # macOS has no /proc


@pytest.mark.parametrize(
    ("arch", "flags", "name", "reduce_range"),
    [
        ("x86_64", AVX2, "x86-no-vnni", True),  # VPMADDUBSW saturates int16: 7-bit weights
        ("x86_64", frozenset({"sse4_1"}), "x86-no-vnni", True),
        ("x86_64", frozenset(), "x86-no-vnni", True),  # flags unknown: the safe choice
        ("x86_64", AVX512_VNNI, "x86-vnni", False),
        ("AMD64", AVX2 | {"avx_vnni"}, "x86-vnni", False),
        ("aarch64", frozenset({"asimd"}), "arm64", False),
        ("arm64", frozenset(), "arm64", False),
        ("ppc64le", frozenset(), "generic", True),
    ],
)
def test_int8_settings_follow_the_cpu(
    arch: str, flags: frozenset[str], name: str, reduce_range: bool
) -> None:
    profile = int8_profile(arch, flags)
    assert (profile.name, profile.reduce_range) == (name, reduce_range)


def test_auto_on_a_cpu_machine_with_every_runtime_installed_loads_torch(tmp_path: Path) -> None:
    settings = make_settings(backend="auto", onnx_cache_dir=str(tmp_path))
    backend = create_backend(settings, machine=CPU)
    assert (backend.info().backend, backend.info().device, backend.info().dtype) == (
        "torch",
        "cpu",
        "float32",
    )
    assert backend.selection == CPU_REASON
    assert not any(tmp_path.iterdir()), "nothing was exported or quantized"
