from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reranker.api.app import create_app
from reranker.backends.source import embedded_model_path
from reranker.settings import Settings, load_settings
from tests.redis_server import RedisServer
from tests.server import ServerThread

RUNTIME_PACKAGE = {"torch": "torch", "onnx": "onnxruntime", "mlx": "mlx"}

# The fast tier (./run_tests.sh --fast: ``-m "not slow"``) leaves out every test that needs a real
# model, a server process or a system tool: those using these fixtures, and these modules.
SLOW_FIXTURES = frozenset(
    {
        "serving_backend", "embedded_server", "embedded_path", "cross_encoder_path", "sentence_transformer",
        "family_model", "onnx_cache", "redis_server", "model_server", "bi_server", "cross_server",
    }
)  # fmt: skip
SLOW_MODULES = frozenset(
    {
        # server processes, daemons, nginx, Prometheus, Chromium, wheels
        "test_cli", "test_daemon_scripts", "test_docs", "test_drain", "test_first_hour", "test_job_faults",
        "test_jobs_redis", "test_monitoring", "test_nginx_cluster", "test_packaging", "test_structured_logs",
        "test_supervision", "test_performance_script", "test_job_state_machine", "test_job_cluster",
        # real models loaded by the test itself
        "test_clients_infinity", "test_clients_tei", "test_cross_encoder", "test_long_documents",
        "test_openapi_fuzz", "test_prompts", "test_text_limits", "test_model_families", "test_mlx_families",
        "test_backend_parity", "test_onnx_backend", "test_int8", "test_precision", "test_exact_default",
        "test_embeddings", "test_rerank_model", "test_model_kinds", "test_backend_selection",
    }
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def make_settings(**values: object) -> Settings:
    """Settings from explicit values only: the test machine's environment never leaks in.

    The backend is torch in float32 unless a test says otherwise: the oracles are
    sentence-transformers' float32 numbers, and DTYPE=auto would run bfloat16 on a CPU with AMX
    (tests/test_backend_selection.py, tests/test_exact_default.py and tests/test_precision.py
    cover auto). One batch at a time unless a test says otherwise, so that the batches a fake
    backend records do not depend on the test machine's CPUs (tests/test_resources.py covers
    the default; servers started as processes run it).
    """
    overrides = {"backend": "torch", "dtype": "float32", "max_parallel_requests": 1, **values}
    return load_settings(environ={}, overrides=overrides)


def backend_param(name: str) -> Any:
    """A pytest param for BACKEND=name, skipped with the reason when its package is missing."""
    package = RUNTIME_PACKAGE[name]
    missing = importlib.util.find_spec(package) is None
    reason = f"BACKEND={name} needs {package} (pip install -r requirements-backends.txt)"
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason), id=name)


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX_CACHE_DIR for the session: each model is exported (and quantized) once."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session", params=[backend_param(name) for name in RUNTIME_PACKAGE])
def serving_backend(request: pytest.FixtureRequest, onnx_cache: Path) -> dict[str, str]:
    """The settings of one backend; the HTTP suite on the real model runs once per backend.

    ONNX runs in fp32 here (the oracles are sentence-transformers' own numbers); int8 has
    its own closeness tests in test_onnx_backend.py.
    """
    values = {"backend": request.param, "onnx_quantize": "none", "onnx_cache_dir": str(onnx_cache)}
    if request.param == "mlx" and sys.platform != "darwin":
        values["request_timeout_s"] = "300"  # mlx-cpu on Linux: ~40x slower than torch (no BLAS)
    return values


@pytest.fixture(scope="session")
def slow_backend_skip(serving_backend: dict[str, str]) -> None:
    """For tests that push thousands of texts through the model to check the controller, not the
    backend: MLX on Linux CPU has no BLAS (about 40x slower than torch), so they skip there."""
    if serving_backend["backend"] == "mlx" and sys.platform != "darwin":
        pytest.skip("mlx-cpu on Linux is ~40x slower than torch; the controller check is backend-independent")


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def cross_encoder_path(tmp_path_factory: pytest.TempPathFactory, embedded_path: Path) -> Path:
    """A real single-label cross-encoder built from the shipped weights (seeded head), saved locally."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(1234)
    model = CrossEncoder(str(embedded_path), num_labels=1, device="cpu")
    target = tmp_path_factory.mktemp("cross-encoder")
    model.save(str(target))
    return target


@pytest.fixture(scope="session")
def sentence_transformer(embedded_path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedded_path), device="cpu").eval()


@pytest.fixture(scope="session")
def embedded_server(serving_backend: dict[str, str]) -> Iterator[ServerThread]:
    """The real server on the embedded default model, shared by the read-only integration tests
    (once per backend)."""
    with ServerThread(create_app(make_settings(**serving_backend))) as server:
        assert server.runtime.status.value == "healthy", server.runtime.error
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (skipped when it is not installed, except in CI);
    tests keep apart by REDIS_JOB_QUEUE."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``family_model(name) -> Path``: the tiny random-weight model of family ``name``
    (tests/families.py FAMILIES), built on first use and reused for the whole session."""
    from tests.families import build_family

    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}
    lock = threading.Lock()

    def get(name: str) -> Path:
        with lock:
            if name not in built:
                built[name] = build_family(name, root / name)
            return built[name]

    return get
