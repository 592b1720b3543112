"""ONNX int8: only when asked for, with this CPU's quantization settings, refused below
ONNX_INT8_MIN_AGREEMENT, and - run one item at a time - independent of batch company.

What is checked is what holds on every CPU (AVX2, AVX-512 VNNI, ARM): the start-up
agreement check and the floor it enforces, the refusal, and batch invariance. The exact
agreement figure differs by instruction set (test_multi_backend.py prints it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.factory import create_backend
from reranker.backends.onnx_quantize import int8_profile
from reranker.backends.selection import probe_machine
from reranker.errors import StartupError
from reranker.settings import load_settings
from tests.backend_texts import QUERY, TEXTS
from tests.conftest import make_settings
from tests.server import ServerThread
from tests.test_exact_default import comparable_settings, same_request_three_ways

pytest.importorskip("onnxruntime", reason="ONNX_QUANTIZE=int8 needs onnxruntime (requirements-backends.txt)")

FLOOR = load_settings(environ={}).onnx_int8_min_agreement  # default ONNX_INT8_MIN_AGREEMENT


def int8_settings(onnx_cache: Path, **values: object):
    return make_settings(backend="onnx", onnx_quantize="int8", onnx_cache_dir=str(onnx_cache), **values)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_int8_is_served_when_asked_for_with_this_cpus_settings(onnx_cache: Path) -> None:
    backend = create_backend(int8_settings(onnx_cache))
    machine = probe_machine()
    profile = int8_profile(machine.arch, machine.cpu_flags)
    info = backend.info()
    assert (info.backend, info.dtype, backend.selection) == (
        "onnx",
        "int8",
        "BACKEND=onnx ONNX_QUANTIZE=int8",
    )
    assert info.details["int8_profile"] == profile.why
    assert backend.path.name.endswith(f"-int8-{profile.name}.onnx")
    assert backend.agreement.value >= FLOOR, backend.agreement
    assert info.details["agreement_with_torch"].startswith("worst cosine 0.9")


def test_int8_vectors_stay_above_the_floor_and_ignore_batch_company(onnx_cache: Path) -> None:
    int8 = create_backend(int8_settings(onnx_cache))
    reference = create_backend(make_settings(backend="torch"))
    items = int8.tokenize_texts([QUERY, *TEXTS])
    got = int8.forward(items)
    assert cosines(got, reference.forward(items)).min() >= FLOOR
    alone = np.concatenate([int8.forward([item]) for item in items])
    np.testing.assert_array_equal(got, alone)  # exactly: each item runs alone
    np.testing.assert_array_equal(int8.forward(items[3:9])[2], alone[5])


def test_a_cross_encoder_in_int8_scores_each_pair_alone(onnx_cache: Path, cross_encoder_path: Path) -> None:
    int8 = create_backend(int8_settings(onnx_cache, local_model_path=str(cross_encoder_path)))
    assert int8.agreement.value >= FLOOR and "largest score difference" in int8.agreement.text
    pairs = int8.tokenize_pairs([(QUERY, text) for text in TEXTS])
    together = int8.forward(pairs)
    np.testing.assert_array_equal(together, np.concatenate([int8.forward([pair]) for pair in pairs]))


def test_int8_below_the_threshold_is_a_start_up_error_naming_the_figure(
    onnx_cache: Path, cross_encoder_path: Path
) -> None:
    settings = int8_settings(onnx_cache, onnx_int8_min_agreement=0.99999)  # no int8 model reaches it
    expected = (
        r"ONNX int8 agreement with torch fp32 is 0\.9\d{5} \(worst cosine 0\.9\d{5} over 8 probes\), "
        r"below ONNX_INT8_MIN_AGREEMENT=0\.99999 \(int8 here: .+\); serve fp32 with ONNX_QUANTIZE=none, "
        r"or lower ONNX_INT8_MIN_AGREEMENT to accept it"
    )
    with pytest.raises(StartupError, match=expected):
        create_backend(settings)
    cross_encoder = settings.model_copy(update={"local_model_path": str(cross_encoder_path)})
    with pytest.raises(
        StartupError, match=r"is 0\.9\d{5} \(largest score difference 0\.0\d{5} over 8 probes\)"
    ):
        create_backend(cross_encoder)


@pytest.fixture(scope="module")
def int8_server(onnx_cache: Path) -> Iterator[ServerThread]:
    settings = comparable_settings(backend="onnx", onnx_quantize="int8", onnx_cache_dir=str(onnx_cache))
    with ServerThread(create_app(settings)) as server:
        assert server.runtime.status.value == "healthy", server.runtime.error
        yield server


def test_an_int8_answer_does_not_depend_on_batch_company_or_the_cache(int8_server: ServerThread) -> None:
    with int8_server.client() as client:
        assert client.get("/health").json()["model"]["dtype"] == "int8"
    answers = same_request_three_ways(int8_server)
    for way, got in answers.items():
        np.testing.assert_allclose(got, answers["alone"], rtol=0, atol=1e-6, err_msg=way)
