from __future__ import annotations

import os
import subprocess
import sys

import pytest

from reranker.errors import StartupError
from reranker.settings import EMBEDDED_MODEL, load_settings


def test_defaults_serve_the_embedded_model_on_port_8000() -> None:
    settings = load_settings(environ={})
    assert settings.model_source == EMBEDDED_MODEL
    assert settings.port == 8000
    assert settings.model_kind == "auto"


def test_environment_values_are_parsed_and_local_path_wins() -> None:
    settings = load_settings(
        environ={
            "MODEL_NAME": "cross-encoder/ms-marco-MiniLM-L-6-v2",
            "LOCAL_MODEL_PATH": "/models/x",
            "BATCH_SIZE": "16",
            "USE_MLX": "true",
            "DEVICE_PREFERENCE": "CPU",
            "REQUEST_TIMEOUT_S": "2.5",
        }
    )
    assert settings.model_source == "/models/x"
    assert (settings.batch_size, settings.use_mlx, settings.device_preference) == (16, True, "cpu")
    assert settings.request_timeout_s == 2.5


def test_cli_overrides_win_over_environment() -> None:
    settings = load_settings(environ={"PORT": "9000"}, overrides={"port": "9100", "host": None})
    assert settings.port == 9100


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PORT", "abc"), ("BATCH_SIZE", "0"), ("DEVICE_PREFERENCE", "tpu"), ("MODEL_KIND", "both")],
)
def test_bad_value_is_one_line_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(StartupError) as caught:
        load_settings(environ={variable: value})
    message = caught.value.message
    assert f"{variable}={value!r}" in message
    assert "\n" not in message


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PORT": "abc"}, "PORT='abc'"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE='0'"),
        ({"DEVICE_PREFERENCE": "tpu"}, "DEVICE_PREFERENCE='tpu'"),
        ({"LOCAL_MODEL_PATH": "/does/not/exist"}, "/does/not/exist does not exist"),
        (
            {"MODEL_NAME": "cross-encoder/ms-marco-MiniLM-L-6-v2", "HF_HUB_OFFLINE": "1"},
            "not in the local Hugging Face cache and downloading is off",
        ),
        ({"MODEL_NAME": "not a hub id!"}, "a hub id looks like 'org/name'"),
    ],
)
def test_cli_refuses_bad_configuration_with_one_line(env: dict[str, str], expected: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "reranker"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert expected in lines[0]
    assert "Traceback" not in completed.stderr
