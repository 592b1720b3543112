"""DTYPE: half precision where the hardware has it, held to a floor measured at start-up; ONNX
Runtime float32 on a CPU only when it equals torch; the GPU path's pieces with the device
injected. Nothing here depends on this machine's CPU: the machine probe is injected, and
torch computes bfloat16 on any CPU (only slowly without AMX)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reranker.api.app import create_app
from reranker.backends import onnx_backend, torch_backend
from reranker.backends.agreement import Agreement, compare, meets_half_floor
from reranker.backends.base import ModelKind
from reranker.backends.factory import create_backend, half_precision_verdict, onnx_is_exact
from reranker.backends.selection import Choice, Machine
from reranker.backends.source import resolve_model_source
from reranker.backends.torch_backend import TorchBackend, attention_kwargs, cuda_memory_details, upcast
from reranker.engine.adaptive import is_out_of_memory
from reranker.engine.model import batch_size_for
from reranker.errors import StartupError
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings
from tests.server import ServerThread

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
CPU_AMX = Machine(cuda=False, mps=False, apple_silicon=False, mlx=False, arch="x86_64", cpu_flags=AMX)
CPU_AVX2 = replace(CPU_AMX, cpu_flags=frozenset({"avx2", "fma"}))
FLOOR = make_settings().half_precision_min_agreement  # the default HALF_PRECISION_MIN_AGREEMENT
# The same text alone and inside a batch of other lengths, bfloat16, largest difference of a unit
# vector's component: measured 1.3e-3 on all-MiniLM-L6-v2 (Xeon with AMX; float32: 1.5e-7). Other
# CPUs run other bfloat16 kernels, so the bound allows about 4x.
BF16_BATCH_DEPENDENCE = 5e-3
BAD = Agreement(0.95, "worst cosine 0.950000 over 8 probes", 0.3, ModelKind.BI_ENCODER)


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def embedded_source():
    return resolve_model_source(make_settings())


@pytest.fixture(scope="module")
def fp32(embedded_source) -> TorchBackend:
    return TorchBackend(embedded_source, "cpu", "float32")


@pytest.fixture(scope="module")
def bf16(embedded_source) -> TorchBackend:
    return TorchBackend(embedded_source, "cpu", "bfloat16")


# The floor, and the verdicts on it


@pytest.mark.parametrize(
    ("kind", "value", "meets"),
    [
        (ModelKind.BI_ENCODER, 0.99994, True),  # bfloat16 on all-MiniLM-L6-v2's probes
        (ModelKind.BI_ENCODER, 0.999, True),
        (ModelKind.BI_ENCODER, 0.998, False),
        (ModelKind.CROSS_ENCODER, 1 - 0.02, True),  # scores: 20x the vectors' gap
        (ModelKind.CROSS_ENCODER, 1 - 0.021, False),
        (ModelKind.BI_ENCODER, 0.0, False),  # non-finite output
    ],
)
def test_the_half_precision_floor(kind: ModelKind, value: float, meets: bool) -> None:
    assert meets_half_floor(Agreement(value, "", 0.0, kind), 0.999) is meets


def test_non_finite_half_precision_output_never_meets_the_floor() -> None:
    agreement = compare(ModelKind.BI_ENCODER, np.array([[np.inf, 1.0]]), np.array([[1.0, 1.0]]))
    assert agreement.value == 0.0 and not meets_half_floor(agreement, 0.5)


def test_below_the_floor_auto_falls_back_and_an_explicit_dtype_refuses() -> None:
    auto = Choice("torch", "cpu", "none", "auto", dtype="bfloat16", dtype_asked=False)
    assert "short of HALF_PRECISION_MIN_AGREEMENT=0.999" in half_precision_verdict(auto, BAD, 0.999)
    with pytest.raises(StartupError) as refused:
        half_precision_verdict(replace(auto, dtype_asked=True), BAD, 0.999)
    assert refused.value.message.startswith("DTYPE=bfloat16: bfloat16 against float32: worst cosine 0.950000")
    assert "HALF_PRECISION_MIN_AGREEMENT=0.999" in refused.value.message
    good = replace(BAD, value=0.9999)
    assert half_precision_verdict(replace(auto, dtype_asked=True), good, 0.999) is None


def test_auto_on_an_amx_cpu_serves_bfloat16_and_says_why() -> None:
    backend = create_backend(make_settings(backend="auto", dtype="auto"), machine=CPU_AMX)
    info = backend.info()
    assert (info.backend, info.device, info.dtype) == ("torch", "cpu", "bfloat16")
    assert backend.selection.startswith(
        "auto: CPU only; bfloat16 (CPU with AMX: amx_bf16), worst cosine 0.99"
    )
    assert backend.half_agreement is not None and backend.half_agreement.value >= FLOOR
    assert info.details["half_precision_agreement"] == backend.half_agreement.text
    assert info.details["padding"] == "batches padded to a multiple of 8 tokens"


def test_a_fake_figure_below_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto falls back to float32 saying why; DTYPE=bfloat16 refuses to start naming the figure."""
    monkeypatch.setattr(torch_backend, "compare", lambda kind, got, want: BAD)
    backend = create_backend(make_settings(backend="auto", dtype="auto"), machine=CPU_AMX)
    assert (backend.info().backend, backend.info().dtype) == ("torch", "float32")
    assert "but bfloat16 against float32: worst cosine 0.950000 over 8 probes, short of " in backend.selection
    assert backend.selection.endswith("(a worst cosine of 0.999): float32 instead")
    with pytest.raises(
        StartupError, match=r"DTYPE=bfloat16: .*0\.950000.*HALF_PRECISION_MIN_AGREEMENT=0\.999"
    ):
        create_backend(make_settings(backend="torch", dtype="bfloat16"), machine=CPU_AVX2)


# bfloat16 numerics on the CPU


def test_bfloat16_outputs_are_float32_and_rank_an_obvious_query_the_same(
    fp32: TorchBackend, bf16: TorchBackend
) -> None:
    assert bf16.info().dtype == "bfloat16" and fp32.info().dtype == "float32"
    got, want = bf16.embed_texts([QUERY, *TEXTS]), fp32.embed_texts([QUERY, *TEXTS])
    assert got.dtype == np.float32
    got, want = unit(got), unit(want)
    assert (got * want).sum(axis=1).min() >= FLOOR
    half_scores, scores = got[1:] @ got[0], want[1:] @ want[0]
    assert np.argmax(half_scores) == np.argmax(scores) == 0  # "Most broken bones heal in six to eight weeks."
    assert set(np.argsort(-half_scores)[:5]) == set(np.argsort(-scores)[:5])


def test_bfloat16_batch_dependence_is_within_its_stated_bound(bf16: TorchBackend, fp32: TorchBackend) -> None:
    texts = [QUERY, *TEXTS]
    company = [("word " * k).strip() for k in range(1, 60, 7)]  # other lengths: other padding
    assert (bf16.tokenizer.pad_multiple, fp32.tokenizer.pad_multiple) == (8, 1)  # float32: as before
    for backend, bound in ((bf16, BF16_BATCH_DEPENDENCE), (fp32, 1e-6)):
        alone = np.concatenate([backend.embed_texts([text]) for text in texts])
        together = backend.embed_texts(texts + company, batch_size=64)[: len(texts)]
        assert np.abs(unit(alone) - unit(together)).max() <= bound, backend.info().dtype


def test_pooling_runs_on_float32_after_a_bfloat16_transformer(bf16: TorchBackend) -> None:
    seen: list[torch.dtype] = []
    pooling = bf16.module[1]
    handle = pooling.register_forward_pre_hook(lambda m, args: seen.append(args[0]["token_embeddings"].dtype))
    try:
        bf16.embed_texts(["one text"])
    finally:
        handle.remove()
    assert seen == [torch.float32]
    assert next(bf16.module[0].parameters()).dtype == torch.bfloat16
    features = upcast({"x": torch.ones(2, dtype=torch.bfloat16), "ids": torch.ones(2, dtype=torch.long)})
    assert (features["x"].dtype, features["ids"].dtype) == (torch.float32, torch.long)


def test_a_bfloat16_cross_encoder_meets_the_floor(cross_encoder_path: Path) -> None:
    source = resolve_model_source(make_settings(model_name=str(cross_encoder_path)))
    half, full = TorchBackend(source, "cpu", "bfloat16"), TorchBackend(source, "cpu", "float32")
    assert half.half_agreement is not None and meets_half_floor(half.half_agreement, FLOOR)
    pairs = [(QUERY, text) for text in TEXTS]
    got, want = half.score_pairs(pairs), full.score_pairs(pairs)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.05


def test_a_causal_reranker_upcasts_its_yes_no_logits_before_the_difference(
    family_model: Callable[[str], Path],
) -> None:
    source = resolve_model_source(make_settings(model_name=str(family_model("qwen3-reranker"))))
    backend = TorchBackend(source, "cpu", "bfloat16")
    score_module = backend.module[len(list(backend.module.children())) - 1]
    seen: list[torch.dtype] = []
    handle = score_module.register_forward_pre_hook(
        lambda m, args: seen.extend(
            v.dtype for v in args[0].values() if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
    )
    try:
        scores = backend.score_pairs([("city", "berlin is a city"), ("city", "rain today")])
    finally:
        handle.remove()
    assert type(score_module).__name__ == "LogitScore"
    assert seen and set(seen) == {torch.float32} and scores.dtype == np.float32


def test_mlx_runs_bfloat16_against_its_own_float32(embedded_source) -> None:
    pytest.importorskip("mlx.core")
    backend = create_backend(make_settings(backend="mlx", dtype="bfloat16"), machine=CPU_AVX2)
    assert backend.info().dtype == "bfloat16"
    assert backend.half_agreement is not None and backend.half_agreement.value >= FLOOR
    assert backend.embed_texts(["a text"]).dtype == np.float32


# ONNX Runtime float32 on a CPU: served only when it equals torch


def test_auto_serves_onnx_float32_when_it_equals_torch(onnx_cache: Path) -> None:
    settings = make_settings(backend="auto", dtype="auto", onnx_cache_dir=str(onnx_cache))
    backend = create_backend(settings, machine=CPU_AVX2)
    assert (backend.info().backend, backend.info().dtype) == ("onnx", "float32")
    assert backend.agreement.largest <= 1e-5 and onnx_is_exact(backend.agreement)
    assert "ONNX Runtime: within 1e-05 of torch (largest difference" in backend.selection


def test_auto_serves_torch_when_onnx_differs(onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drift = Agreement(0.99999, "worst cosine 0.999990 over 8 probes", 3e-4, ModelKind.BI_ENCODER)
    monkeypatch.setattr(onnx_backend, "compare", lambda kind, got, want: drift)
    settings = make_settings(backend="auto", dtype="float32", onnx_cache_dir=str(onnx_cache))
    backend = create_backend(settings, machine=CPU_AMX)
    assert (backend.info().backend, backend.info().dtype) == ("torch", "float32")
    assert backend.selection.endswith("; torch: ONNX Runtime differs from it by 3.00e-04, over 1e-05")
    assert not onnx_is_exact(drift)


# The GPU path, with the device injected


def test_cuda_attention_kernels() -> None:
    assert attention_kwargs("cpu", "bfloat16") == {}
    assert attention_kwargs("cuda", "float32") == {"attn_implementation": "sdpa"}
    flash = torch_backend.importlib.util.find_spec("flash_attn") is not None
    expected = "flash_attention_2" if flash else "sdpa"
    assert attention_kwargs("cuda", "float16") == {"attn_implementation": expected}


def test_cuda_memory_is_reported() -> None:
    mib = 1024**2
    cuda = SimpleNamespace(
        get_device_properties=lambda device: SimpleNamespace(total_memory=80 * 1024 * mib),
        memory_allocated=lambda device: 300 * mib,
        memory_reserved=lambda device: 512 * mib,
        max_memory_allocated=lambda device: 900 * mib,
    )
    details = cuda_memory_details(cuda, torch.device("cuda"))
    assert details == {
        "device_memory_allocated_mib": "300",
        "device_memory_reserved_mib": "512",
        "device_memory_peak_mib": "900",
        "device_memory_total_mib": "81920",
    }


def test_cuda_out_of_memory_is_out_of_memory() -> None:
    """The controller halves the batch and retries on it, as on host memory."""
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))


def test_a_gpu_takes_a_larger_default_batch() -> None:
    gpu = SimpleNamespace(preferred_batch_size=torch_backend.CUDA_BATCH_SIZE)
    assert batch_size_for(make_settings(), gpu) == 128
    assert batch_size_for(make_settings(batch_size=16), gpu) == 16  # BATCH_SIZE set: it wins
    assert batch_size_for(make_settings(), SimpleNamespace(preferred_batch_size=None)) == 32


# /health


def test_health_says_which_precision_and_why() -> None:
    settings = make_settings(backend="auto", dtype="auto")
    app = create_app(settings, backend_factory=lambda s: create_backend(s, machine=CPU_AMX))
    with ServerThread(app) as server, server.client() as client:
        model = client.get("/health").json()["model"]
        embedded = client.post("/v1/embeddings", json={"input": [QUERY]}).json()["data"][0]["embedding"]
    assert (model["backend"], model["dtype"]) == ("torch", "bfloat16")
    assert "bfloat16 (CPU with AMX: amx_bf16)" in model["selected_because"]
    assert model["details"]["half_precision_agreement"].startswith("worst cosine 0.99")
    assert abs(np.linalg.norm(embedded) - 1.0) < 1e-6  # normalised on float32
