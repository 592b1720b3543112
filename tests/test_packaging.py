"""pyproject.toml installs what the requirement files pin, and its wheel carries the whole package.

The rule (DEPLOYMENT.md, "Installing as a package"): pyproject's dependencies are the exact pins of
requirements.txt, the ``mlx`` extra is requirements-backends.txt, the ``otel`` extra is
requirements-otel.txt and the ``sdk`` extra is the client SDKs' pins in requirements-dev.txt; same
names, extras, versions and markers, nothing more or less.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import reranker
from reranker import __main__ as entry
from tests.scripts import REPO_ROOT

SDK_PACKAGES = ("cohere", "openai")


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirement_key(line: str) -> tuple[str, tuple[str, ...], str, str]:
    """What must agree between two spellings of one requirement: name, extras, versions, marker."""
    req = Requirement(line)
    return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier), str(req.marker or "")


def pinned(path: str) -> list[tuple[str, tuple[str, ...], str, str]]:
    """The requirements a file states itself (``-r`` includes and comments left out)."""
    found = []
    for raw in (REPO_ROOT / path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            found.append(requirement_key(line))
    return found


def declared(requirements: list[str]) -> list[tuple[str, tuple[str, ...], str, str]]:
    return [requirement_key(line) for line in requirements]


def test_base_dependencies_are_the_pins_of_requirements_txt() -> None:
    base = declared(pyproject()["project"]["dependencies"])
    assert sorted(base) == sorted(pinned("requirements.txt"))
    assert all(spec.startswith("==") for _, _, spec, _ in base)  # exact pins, as the files


def test_extras_are_the_pins_of_their_requirement_files() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    assert set(extras) == {"mlx", "otel", "sdk", "onnx", "redis"}
    base = pinned("requirements.txt")
    for extra, names in (("onnx", {"onnxruntime", "onnx"}), ("redis", {"redis"})):  # in the base already
        assert sorted(declared(extras[extra])) == sorted(key for key in base if key[0] in names)
    assert sorted(declared(extras["mlx"])) == sorted(pinned("requirements-backends.txt"))
    assert sorted(declared(extras["otel"])) == sorted(pinned("requirements-otel.txt"))
    dev = [key for key in pinned("requirements-dev.txt") if key[0] in SDK_PACKAGES]
    assert sorted(declared(extras["sdk"])) == sorted(dev) and len(dev) == len(SDK_PACKAGES)


def test_version_and_console_command_are_the_package_s() -> None:
    project = pyproject()["project"]
    assert project["version"] == reranker.__version__
    module, function = project["scripts"]["reranker"].split(":")
    assert (module, function) == ("reranker.__main__", "main") and entry.main.__name__ == function
    with pytest.raises(SystemExit) as version:
        entry.main(["--version"])
    assert version.value.code == 0


@pytest.mark.slow
def test_wheel_from_the_tracked_tree_holds_every_package_file(tmp_path: Path) -> None:
    """Built from a copy of the files git tracks (what a clone has), without the network."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    source = tmp_path / "src"
    for name in tracked:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    built = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("reranker-*.whl")
    assert wheel.name.startswith(f"reranker-{reranker.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"reranker-{reranker.__version__}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    package_files = {name for name in tracked if name.startswith("reranker/")}
    assert package_files - names == set()  # Python modules and any data file the package ships
    assert {name.split("/", 1)[0] for name in names} == {"reranker", info}  # no tests, no scripts
    assert "reranker = reranker.__main__:main" in entry_points
    requires = [
        line.removeprefix("Requires-Dist: ") for line in metadata.splitlines() if "Requires-Dist" in line
    ]
    base = [line for line in requires if "extra ==" not in line]
    assert sorted(declared(base)) == sorted(pinned("requirements.txt"))
