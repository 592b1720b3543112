"""One source for settings: descriptions on the fields, ENV_VARS_QUICK_REF.md and --help from them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from reranker.__main__ import build_parser
from reranker.model_specs import MODEL_KEYS
from reranker.settings import Settings, env_name
from reranker.settings_reference import SECTIONS, format_default, render

REPO_ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python -m reranker.settings_reference > ENV_VARS_QUICK_REF.md"


def test_every_field_has_a_short_description() -> None:
    for name, field in Settings.model_fields.items():
        description = field.description or ""
        assert description.strip(), f"Settings.{name} has no description"
        assert "|" not in description and "\n" not in description, name  # one table cell
        assert len(description) <= 300, f"{name}: {len(description)} characters; move the rest to docs/"


def test_every_field_is_in_exactly_one_section() -> None:
    listed = Counter(name for _, names in SECTIONS.values() for name in names)
    assert {name for name, times in listed.items() if times > 1} == set()
    assert set(listed) == set(Settings.model_fields)


def test_committed_quick_reference_is_the_rendered_one() -> None:
    committed = (REPO_ROOT / "ENV_VARS_QUICK_REF.md").read_text(encoding="utf-8")
    assert committed == render(), f"ENV_VARS_QUICK_REF.md is stale: run `{REGENERATE}`"


def test_quick_reference_has_a_row_per_variable() -> None:
    text = render()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in text, name
    assert "exit code 2" in text


def test_models_file_description_names_every_key() -> None:
    description = Settings.model_fields["models_file"].description or ""
    for key in MODEL_KEYS:
        assert f"`{key}`" in description, key


def test_help_prints_each_description_with_its_env_and_default() -> None:
    parser = build_parser()
    helps = {action.dest: action.help or "" for action in parser._actions}
    for name, field in Settings.model_fields.items():
        shown = helps[name] % {}  # as argparse prints it: "%%" is "%"
        assert shown.startswith(field.description or "?"), name
        expected = f"(env {env_name(name)}, default {format_default(field.default)})"
        assert shown.endswith(expected), name
    assert helps["port"].endswith("(env PORT, default 8000)")
    assert helps["models"].endswith("(env MODELS, default unset)")
    assert helps["embedding_adaptive_batching"].endswith("default true)")
    text = parser.format_help()  # the whole of --help: one group per section
    for title in SECTIONS:
        assert f"\n{title}:\n" in text, title
    assert "percentage" in text and "%%" not in text
