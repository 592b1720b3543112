"""BACKEND=auto: the decision on every kind of machine, and on this one end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends import onnx_backend
from reranker.backends.factory import create_backend
from reranker.backends.selection import Machine, choose
from reranker.errors import StartupError
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings
from tests.server import ServerThread

NOTHING = Machine(cuda=False, mps=False, apple_silicon=False, mlx=False, onnxruntime=False)
CPU_ONNX = Machine(cuda=False, mps=False, apple_silicon=False, mlx=False, onnxruntime=True)
CUDA_BOX = Machine(cuda=True, mps=False, apple_silicon=False, mlx=True, onnxruntime=True)
MAC_MLX = Machine(cuda=False, mps=True, apple_silicon=True, mlx=True, onnxruntime=True)
MAC_NO_MLX = Machine(cuda=False, mps=True, apple_silicon=True, mlx=False, onnxruntime=True)


@pytest.mark.parametrize(
    ("machine", "settings", "expected", "reason"),
    [
        (CUDA_BOX, {}, ("torch", "cuda", "none"), "CUDA GPU"),
        (MAC_MLX, {}, ("mlx", "mlx", "none"), "Apple Silicon with mlx"),
        (MAC_NO_MLX, {}, ("torch", "mps", "none"), "MPS"),
        (CPU_ONNX, {}, ("onnx", "cpu", "int8"), "CPU only, onnxruntime installed: ONNX int8"),
        (CPU_ONNX, {"onnx_quantize": "none"}, ("onnx", "cpu", "none"), "ONNX none"),
        (NOTHING, {}, ("torch", "cpu", "none"), "onnxruntime is not installed"),
        (CUDA_BOX, {"device_preference": "cpu"}, ("onnx", "cpu", "int8"), "CPU only"),
        (MAC_MLX, {"device_preference": "mps"}, ("torch", "mps", "none"), "MPS"),
        (CPU_ONNX, {"use_mlx": True}, ("mlx", "mlx", "none"), "USE_MLX=true"),
        (CUDA_BOX, {"backend": "onnx"}, ("onnx", "cuda", "none"), "BACKEND=onnx"),
        (CPU_ONNX, {"backend": "onnx"}, ("onnx", "cpu", "int8"), "BACKEND=onnx"),
        (CUDA_BOX, {"backend": "torch"}, ("torch", "cuda", "none"), "BACKEND=torch"),
        (CPU_ONNX, {"backend": "mlx"}, ("mlx", "mlx", "none"), "BACKEND=mlx"),
    ],
)
def test_choice_on_each_kind_of_machine(
    machine: Machine, settings: dict, expected: tuple[str, str, str], reason: str
) -> None:
    choice = choose(make_settings(**{"backend": "auto", **settings}), machine)
    assert (choice.backend, choice.device, choice.quantize) == expected
    assert reason in choice.reason
    assert choice.automatic == (settings.get("backend", "auto") == "auto")


@pytest.mark.parametrize(
    ("machine", "preference", "message"),
    [(CPU_ONNX, "cuda", "no CUDA device"), (CPU_ONNX, "mps", "no MPS")],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_an_unavailable_device_preference_is_a_start_up_error(
    machine: Machine, preference: str, message: str, backend: str
) -> None:
    with pytest.raises(StartupError, match=message):
        choose(make_settings(backend=backend, device_preference=preference), machine)


pytest.importorskip("onnxruntime", reason="auto picks ONNX only when onnxruntime is installed")


def test_auto_on_this_cpu_machine_serves_onnx_int8_and_says_why(
    onnx_cache: Path, sentence_transformer
) -> None:
    settings = make_settings(backend="auto", onnx_cache_dir=str(onnx_cache))
    with ServerThread(create_app(settings)) as server, server.client() as client:
        model = client.get("/health").json()["model"]
        results = client.post("/rerank", json={"query": QUERY, "documents": TEXTS}).json()["results"]
    assert (model["backend"], model["device"], model["dtype"]) == ("onnx", "cpu", "int8")
    assert model["selected_because"] == "auto: CPU only, onnxruntime installed: ONNX int8"
    assert model["details"]["agreement_with_torch"].startswith("worst cosine 0.99")
    vectors = sentence_transformer.encode([QUERY, *TEXTS], normalize_embeddings=True)
    expected = vectors[1:] @ vectors[0]
    served = np.array([r["score"] for r in sorted(results, key=lambda r: r["index"])])
    assert np.abs(served - expected).max() < 0.03  # int8: close, not equal (fp32 parity is 1e-5)
    ranks = [np.argsort(np.argsort(s)) for s in (served, expected)]
    assert np.corrcoef(*ranks)[0, 1] >= 0.95


def broken_export(*_: object) -> None:
    raise RuntimeError("unsupported operator FancyAttention")


def test_auto_falls_back_to_torch_when_the_export_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_backend, "_export", broken_export)
    backend = create_backend(make_settings(backend="auto", onnx_cache_dir=str(tmp_path)), machine=CPU_ONNX)
    assert backend.info().backend == "torch"
    assert backend.selection == (
        "auto: CPU only, onnxruntime installed: ONNX int8; ONNX export failed "
        "(RuntimeError: unsupported operator FancyAttention): torch"
    )
    with pytest.raises(RuntimeError, match="FancyAttention"):
        create_backend(make_settings(backend="onnx", onnx_cache_dir=str(tmp_path)), machine=CPU_ONNX)


def test_auto_falls_back_to_torch_when_int8_disagrees(
    onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_backend, "MIN_COSINE", 1.01)  # no quantized model reaches it
    backend = create_backend(make_settings(backend="auto", onnx_cache_dir=str(onnx_cache)), machine=CPU_ONNX)
    assert backend.info().backend == "torch"
    assert "ONNX int8 disagrees with torch (worst cosine 0.99" in backend.selection
    explicit = create_backend(make_settings(backend="onnx", onnx_cache_dir=str(onnx_cache)), machine=CPU_ONNX)
    assert (explicit.info().backend, explicit.agrees) == ("onnx", False)  # asked for: served, with a warning
