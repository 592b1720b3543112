"""BACKEND=auto: the decision on every kind of machine (each one a probe the test makes up),
the CPU probe, and the int8 settings each kind of CPU gets."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from reranker.backends.onnx_quantize import int8_profile
from reranker.backends.selection import Machine, choose, read_cpu_flags
from reranker.errors import StartupError
from reranker.settings import load_settings
from tests.conftest import make_settings

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}
AMX = AVX512_VNNI | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids and newer
CPU = Machine(cuda=False, mps=False, apple_silicon=False, mlx=True, arch="x86_64", cpu_flags=AVX2)
CPU_BARE = replace(CPU, mlx=False)
CPU_NO_ONNX = replace(CPU, onnxruntime=False)
CPU_AMX = replace(CPU, cpu_flags=AMX)
CUDA_BOX = replace(CPU, cuda=True, cpu_flags=AVX512_VNNI, cuda_capability=(8, 0))  # an A100
CUDA_T4 = replace(CUDA_BOX, cuda_capability=(7, 5))
CUDA_AMX = replace(CUDA_BOX, cuda_capability=(9, 0), cpu_flags=AMX)  # an H100 host
MAC_MLX = Machine(cuda=False, mps=True, apple_silicon=True, mlx=True, arch="arm64", cpu_flags=frozenset())
MAC_NO_MLX = replace(MAC_MLX, mlx=False)
GRAVITON = Machine(
    cuda=False, mps=False, apple_silicon=False, mlx=False, arch="aarch64", cpu_flags=frozenset({"asimd"})
)
EVERY_MACHINE = [CPU, CPU_BARE, CPU_NO_ONNX, CPU_AMX, CUDA_BOX, CUDA_T4, MAC_MLX, MAC_NO_MLX, GRAVITON]
FP32_CPU = "float32 (no native half precision on this CPU: no amx_bf16)"
CPU_REASON = f"auto: CPU only; {FP32_CPU}"
ONNX_IF_EXACT = ("onnx", "cpu", "none", "float32")  # the factory keeps it only within 1e-5 of torch


@pytest.mark.parametrize(
    ("machine", "settings", "expected", "reason"),
    [
        (CUDA_BOX, {}, ("torch", "cuda", "none", "bfloat16"), "CUDA compute capability 8.0 >= 8.0"),
        (CUDA_AMX, {}, ("torch", "cuda", "none", "bfloat16"), "CUDA compute capability 9.0 >= 8.0"),
        (CUDA_T4, {}, ("torch", "cuda", "none", "float16"), "7.5 < 8.0: no native bfloat16"),
        (MAC_MLX, {}, ("mlx", "mlx", "none", "float16"), "Apple Silicon with mlx installed; float16"),
        (MAC_NO_MLX, {}, ("torch", "mps", "none", "float16"), "MPS) available, mlx is not installed"),
        (CPU_AMX, {}, ("torch", "cpu", "none", "bfloat16"), "auto: CPU only; bfloat16 (CPU with AMX"),
        (CPU, {}, ONNX_IF_EXACT, CPU_REASON),
        (CPU_BARE, {}, ONNX_IF_EXACT, CPU_REASON),
        (GRAVITON, {}, ONNX_IF_EXACT, CPU_REASON),
        (CPU_NO_ONNX, {}, ("torch", "cpu", "none", "float32"), "torch (onnxruntime is not installed)"),
        (CPU, {"onnx_quantize": "int8"}, ONNX_IF_EXACT, CPU_REASON),
        (CPU_AMX, {"dtype": "float32"}, ONNX_IF_EXACT, "auto: CPU only; DTYPE=float32"),
        (CPU, {"dtype": "bfloat16"}, ("torch", "cpu", "none", "bfloat16"), "auto: CPU only; DTYPE=bfloat16"),
        (CUDA_BOX, {"dtype": "float32"}, ("torch", "cuda", "none", "float32"), "DTYPE=float32"),
        (CUDA_BOX, {"device_preference": "cpu"}, ONNX_IF_EXACT, "auto: DEVICE_PREFERENCE=cpu: on the CPU;"),
        (
            CUDA_AMX,
            {"device_preference": "cpu"},
            ("torch", "cpu", "none", "bfloat16"),
            "DEVICE_PREFERENCE=cpu",
        ),
        (MAC_MLX, {"device_preference": "mps"}, ("torch", "mps", "none", "float16"), "DEVICE_PREFERENCE=mps"),
        (MAC_MLX, {"device_preference": "cpu"}, ONNX_IF_EXACT, "auto: DEVICE_PREFERENCE=cpu: on the CPU;"),
        (CPU, {"use_mlx": True}, ("mlx", "mlx", "none", "float32"), "USE_MLX=true; float32 (MLX on a CPU"),
        (CUDA_BOX, {"backend": "onnx"}, ("onnx", "cuda", "none", "float32"), "BACKEND=onnx"),
        (CPU, {"backend": "onnx"}, ("onnx", "cpu", "none", "float32"), "BACKEND=onnx"),
        (CPU, {"backend": "onnx", "onnx_quantize": "int8"}, ("onnx", "cpu", "int8", "float32"), "=int8"),
        (CUDA_BOX, {"backend": "torch"}, ("torch", "cuda", "none", "bfloat16"), "BACKEND=torch; bfloat16"),
        (CPU_AMX, {"backend": "torch"}, ("torch", "cpu", "none", "bfloat16"), "BACKEND=torch; bfloat16"),
        (CPU, {"backend": "torch"}, ("torch", "cpu", "none", "float32"), f"BACKEND=torch; {FP32_CPU}"),
        (CPU, {"backend": "mlx"}, ("mlx", "mlx", "none", "float32"), "BACKEND=mlx"),
        (MAC_MLX, {"backend": "mlx"}, ("mlx", "mlx", "none", "float16"), "BACKEND=mlx; float16"),
    ],
)
def test_choice_on_each_kind_of_machine(
    machine: Machine, settings: dict, expected: tuple[str, str, str, str], reason: str
) -> None:
    choice = choose(make_settings(**{"backend": "auto", "dtype": "auto", **settings}), machine)
    assert (choice.backend, choice.device, choice.quantize, choice.dtype) == expected
    assert reason in choice.reason
    assert choice.onnx_if_exact == (expected == ONNX_IF_EXACT and settings.get("backend") != "onnx")
    assert choice.dtype_asked == ("dtype" in settings)


@pytest.mark.parametrize(
    ("machine", "settings", "wrong"),
    [
        (MAC_MLX, {"device_preference": "mps"}, "mlx is not installed"),  # issue 22's review
        (CUDA_BOX, {"device_preference": "cpu"}, "CPU only"),
        (MAC_MLX, {"device_preference": "cpu"}, "CPU only"),
    ],
)
def test_an_explicit_device_preference_is_the_reason_given(
    machine: Machine, settings: dict, wrong: str
) -> None:
    choice = choose(make_settings(backend="auto", **settings), machine)
    assert wrong not in choice.reason
    assert f"DEVICE_PREFERENCE={settings['device_preference']}" in choice.reason


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_onnx_refuses_half_precision(dtype: str) -> None:
    with pytest.raises(StartupError, match=f"DTYPE={dtype}: BACKEND=onnx runs float32"):
        choose(make_settings(backend="onnx", dtype=dtype), CPU)


def test_dtype_setting() -> None:
    assert load_settings(environ={}).dtype == "auto"
    assert load_settings(environ={"DTYPE": " BFloat16 "}).dtype == "bfloat16"
    assert load_settings(environ={}).half_precision_min_agreement == 0.999
    with pytest.raises(StartupError, match="DTYPE='fp8'"):
        load_settings(environ={"DTYPE": "fp8"})
    with pytest.raises(StartupError, match="HALF_PRECISION_MIN_AGREEMENT='0'"):
        load_settings(environ={"HALF_PRECISION_MIN_AGREEMENT": "0"})


MLX_CANNOT = "MLX backend cannot serve 'mpnet' models (it serves bert, ...)"


@pytest.mark.parametrize(
    ("machine", "settings", "expected"),
    [
        (MAC_MLX, {}, ("torch", "mps")),
        (replace(MAC_MLX, mps=False), {}, ("onnx", "cpu")),  # float32 on the CPU: ONNX if exact
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
        assert choice.reason.startswith(f"auto: Apple Silicon, but {MLX_CANNOT}: on {expected[1]};")


@pytest.mark.parametrize("machine", EVERY_MACHINE)
@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_auto_never_serves_int8_and_onnx_only_if_exact(machine: Machine, quantize: str, dtype: str) -> None:
    """Only float32 ONNX, and only on condition (the factory checks 1e-5 against torch), on a CPU:
    whatever is installed, whatever ONNX_QUANTIZE says."""
    choice = choose(make_settings(backend="auto", onnx_quantize=quantize, dtype=dtype), machine)
    assert choice.quantize == "none"
    if choice.backend == "onnx":
        assert choice.onnx_if_exact and (choice.device, choice.dtype) == ("cpu", "float32")


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
