from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reranker.api.app import create_app
from reranker.backends.source import embedded_model_path
from reranker.settings import Settings, load_settings
from tests.server import ServerThread


def make_settings(**values: object) -> Settings:
    """Settings from explicit values only: the test machine's environment never leaks in."""
    return load_settings(environ={}, overrides=values)


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
def embedded_server() -> Iterator[ServerThread]:
    """The real server on the embedded default model, shared by the read-only integration tests."""
    with ServerThread(create_app(make_settings())) as server:
        assert server.runtime.status.value == "healthy", server.runtime.error
        yield server
