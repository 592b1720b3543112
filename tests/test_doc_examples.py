"""Every command and example of README.md and docs/*.md, run against a live server.

The fenced ``bash`` / ``sh`` / ``python`` blocks are extracted. A block preceded by
``<!-- not-run: REASON -->`` is not run (the reason is required, and the skipped blocks are
listed); every other block runs: shell through bash, python through this interpreter, with the
server's ``localhost:8000`` rewritten to a real server on a free port. By default that server
serves the embedded model (outputs are real); a block preceded by ``<!-- server: two-models -->``
goes to a server of two fake models named ``embed`` and ``rerank``, and one preceded by
``<!-- server: kinds -->`` to tiny random-weight models named ``sentiment`` (a 3-label classifier)
and ``splade`` (a sparse model). A block must exit 0 (curl
is run with ``--fail-with-body``, so an HTTP error fails it); when a ```json block follows it, its
output is compared with that JSON: every key shown must be there with the value shown (floats to
1e-4, lists item by item as far as shown), except the volatile ``timing_ms`` and ``id``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.model_specs import model_specs
from tests.conftest import make_settings
from tests.kind_models import classifier, splade
from tests.server import ServerThread

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"bash", "sh", "python"}
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
SERVER = re.compile(r"^<!--\s*server:\s*([\w-]+).*-->$")
LOCAL_URL = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000")
VOLATILE_KEYS = {"timing_ms", "id"}
BLOCK_TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    language: str
    code: str
    not_run: str | None  # the reason, when marked not-run
    server: str  # "model" (the embedded model) or "two-models"
    expected: str | None  # the ```json block right after it, if any

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def extract(path: Path, root: Path = REPO_ROOT) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        language, start = opened.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        code = "\n".join(lines[start + 1 : end]) + "\n"
        expected = None
        if end + 1 < len(lines) and lines[end + 1].strip() == "```json":
            json_end = next(j for j in range(end + 2, len(lines)) if lines[j].startswith("```"))
            expected = "\n".join(lines[end + 2 : json_end])
        if language in RUN_LANGUAGES:
            markers = []
            k = start - 1
            while k >= 0 and lines[k].startswith("<!--"):
                markers.append(lines[k].strip())
                k -= 1
            reason = next((m.group(1) for m in map(NOT_RUN.match, markers) if m), None)
            server = next((m.group(1) for m in map(SERVER.match, markers) if m), "model")
            blocks.append(
                Block(str(path.relative_to(root)), start + 1, language, code, reason, server, expected)
            )
        i = end + 1
    return blocks


BLOCKS = [block for doc in DOCS for block in extract(doc)]
RUNNABLE = [block for block in BLOCKS if block.not_run is None]


def test_the_docs_have_runnable_examples_and_every_skip_says_why() -> None:
    skipped = [block for block in BLOCKS if block.not_run is not None]
    print("\nnot run:")  # the list, for whoever reads the test output (-s)
    for block in skipped:
        print(f"  {block.where} ({block.language}): {block.not_run}")
    assert all(block.not_run for block in skipped), [b.where for b in skipped if not b.not_run]
    assert len(RUNNABLE) >= 10, [b.where for b in RUNNABLE]
    assert {block.doc for block in RUNNABLE} >= {"README.md", "docs/API.md", "docs/MODELS.md"}
    assert {block.server for block in BLOCKS} <= {"model", "two-models", "kinds"}
    # An example that names the server must reach it through the rewritten URL.
    for block in RUNNABLE:
        assert LOCAL_URL.search(block.code), f"{block.where} does not call the server: mark it not-run"


def start_server(name: str, root: Path) -> ServerThread:
    if name == "model":  # the embedded model: real outputs, compared where the doc shows them
        return ServerThread(create_app(make_settings())).start()
    if name == "two-models":  # routing by name: what the answers say does not matter
        settings = make_settings(models="embed=fake-embedder,rerank=fake-reranker")
        backends = {"embed": FakeBackend(), "rerank": FakeBackend(kind=ModelKind.CROSS_ENCODER)}
        return ServerThread(create_app(settings, backends=backends)).start()
    # "kinds": a tiny random-weight 3-label classifier and SPLADE model (tests/kind_models.py)
    models = f"sentiment={classifier(root / 'sentiment')},splade={splade(root / 'splade')}"
    return ServerThread(create_app(make_settings(models=models))).start()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerThread]]:
    """The servers the examples ask for, each started on first use."""
    started: dict[str, ServerThread] = {}
    root = tmp_path_factory.mktemp("doc-models")

    class Servers(dict):
        def __missing__(self, name: str) -> ServerThread:
            started[name] = start_server(name, root)
            return started[name]

    try:
        yield Servers()
    finally:
        for server in started.values():
            server.stop()


CURL_FAILS_ON_HTTP_ERRORS = 'curl() { command curl --fail-with-body --show-error "$@"; }\n'


def run_block(block: Block, url: str) -> subprocess.CompletedProcess[str]:
    code = LOCAL_URL.sub(url, block.code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if block.language == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", CURL_FAILS_ON_HTTP_ERRORS + code]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )


def matches(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Where ``actual`` differs from what ``expected`` shows (keys shown, values shown)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {actual!r}"]
        problems = []
        for key, value in expected.items():
            if key in VOLATILE_KEYS:
                continue
            if key not in actual:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += matches(value, actual[key], f"{path}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) < len(expected):
            return [f"{path}: expected at least {len(expected)} items, got {actual!r}"]
        return [p for i, item in enumerate(expected) for p in matches(item, actual[i], f"{path}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, int | float):
        return [] if abs(expected - actual) <= 1e-4 else [f"{path}: {actual} != {expected}"]
    return [] if expected == actual else [f"{path}: {actual!r} != {expected!r}"]


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_example_runs_against_a_live_server(block: Block, servers: dict[str, ServerThread]) -> None:
    completed = run_block(block, servers[block.server].url)
    assert completed.returncode == 0, f"{block.where} failed:\n{completed.stdout}\n{completed.stderr}"
    if block.expected is not None:
        problems = matches(json.loads(block.expected), json.loads(completed.stdout))
        assert problems == [], f"{block.where}: the output differs from the doc's: {problems}"


def test_output_comparison_reads_what_the_doc_shows() -> None:
    shown = {"results": [{"index": 0, "score": 0.8447}], "timing_ms": {"total": 1.0}, "model": "m"}
    actual = {"results": [{"index": 0, "score": 0.84474, "document": "d"}, {"index": 1}], "model": "m"}
    assert matches(shown, actual) == []  # extra keys and items, volatile timing: fine
    assert matches(shown, {**actual, "model": "other"}) == ["$.model: 'other' != 'm'"]
    assert matches(shown, {**actual, "results": [{"index": 0, "score": 0.9}]}) == [
        "$.results[0].score: 0.9 != 0.8447"
    ]
    assert matches({"usage": {"total_tokens": 29}}, {}) == ["$.usage: missing"]


def test_extract_reads_markers_and_expected_output(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "<!-- not-run: needs docker -->\n```bash\ndocker run x\n```\n\n"
        '<!-- server: two-models -->\n```python\nprint(1)\n```\n```json\n{"a": 1}\n```\n'
        "```yaml\nnot: extracted\n```\n"
    )
    first, second = extract(doc, root=tmp_path)
    assert (first.not_run, first.server, first.expected) == ("needs docker", "model", None)
    assert (second.not_run, second.server, second.expected, second.code) == (
        None,
        "two-models",
        '{"a": 1}',
        "print(1)\n",
    )


def test_models_file_example_is_a_valid_models_file(tmp_path: Path) -> None:
    text = (REPO_ROOT / "docs" / "MODELS.md").read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "models.yaml").write_text(example)
    specs = model_specs(make_settings(models_file=str(tmp_path / "models.yaml")))
    assert [spec.name for spec in specs] == ["embed", "rerank"]
    assert specs[0].settings.batch_size == 64 and specs[1].settings.max_model_length == 1024


def test_readme_route_table_names_every_endpoint() -> None:
    from reranker.api.endpoints import ENDPOINTS

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Routes and dialects", 1)[1].split("\n## ", 1)[0]
    missing = [
        f"{endpoint.method} {endpoint.path}"
        for endpoint in ENDPOINTS
        if not endpoint.path.startswith("/docs/static/")  # the Swagger UI's own files
        and not re.search(rf"[` ]{re.escape(endpoint.path)}[`,\s]", table)
    ]
    assert missing == [], f"README.md's route table lacks {missing}"
