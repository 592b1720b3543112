"""``python -m reranker``: settings from the environment, ``.env`` and flags, then serve.

Every setting is also a flag: ``BATCH_SIZE`` is ``--batch-size``. ``.env`` (or ``$ENV_FILE``)
is read as ``start_reranker.sh`` reads it: ``KEY=VALUE`` lines, read and never executed,
variables already in the environment win. Configuration errors end the process with one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from reranker import __version__
from reranker.backends.factory import preflight
from reranker.backends.source import ModelSource
from reranker.errors import StartupError
from reranker.launch import serve, serve_with_reload
from reranker.logging_setup import configure_logging
from reranker.model_specs import ModelSpec, model_specs
from reranker.settings import Settings, env_name, load_settings
from reranker.settings_reference import SECTIONS, describe, format_default

log = logging.getLogger("reranker")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
QUOTED = re.compile(r"""^"(.*)"$|^'(.*)'$""")


def read_env_file(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of ``path`` (scripts/venv.sh ``load_env_file``'s rules): blank
    lines and ``#`` comments skipped, ``export `` allowed, one pair of surrounding quotes
    stripped; a malformed line is reported and skipped. A missing file is empty."""
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.removesuffix("\r").removeprefix("export ")
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        if not equals or not ENV_KEY.fullmatch(key):
            print(f"ignoring malformed line in {path}: {line}", file=sys.stderr)
            continue
        quoted = QUOTED.match(value)
        values[key] = next(group for group in quoted.groups() if group is not None) if quoted else value
    return values


def load_env_file(environ: dict[str, str] | os._Environ[str]) -> None:
    """Add ``$ENV_FILE`` (default ``./.env``) to ``environ``; variables already set win."""
    for key, value in read_env_file(Path(environ.get("ENV_FILE", ".env"))).items():
        environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reranker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--reload",
        action="store_true",
        help="development: restart on code change; a model that fails to load exits 1",
    )
    section_of = {name: title for title, (_, names) in SECTIONS.items() for name in names}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in Settings.model_fields.items():
        title = section_of.get(name, "Other settings")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        groups[title].add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=env_name(name),
            help=_flag_help(name, field.default),
        )
    return parser


def _flag_help(name: str, default: object) -> str:
    """The field's description, then where else it comes from; ``%`` escaped for argparse."""
    text = f"{describe(name)} (env {env_name(name)}, default {format_default(default)})"
    return text.replace("%", "%%")


def preflight_model(spec: ModelSpec, several: bool) -> ModelSource:
    """Where the model is and its kind; with several models, a failure names the model."""
    try:
        return preflight(spec.settings)
    except StartupError as exc:
        if several:
            raise StartupError(f"model {spec.label}: {exc.message}") from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    reload = args.pop("reload")
    load_env_file(os.environ)  # into the environment: the --reload child process reads it too
    try:
        settings = load_settings(overrides=args)
        configure_logging(settings.log_level, settings.log_format)
        specs = model_specs(settings)
        for spec in specs:
            source = preflight_model(spec, several=len(specs) > 1)
            log.info("model %s (%s) from %s", spec.name or source.name, source.kind.value, source.path)
    except StartupError as exc:
        print(f"reranker: {exc.message}", file=sys.stderr)
        return 2
    if reload:
        return serve_with_reload(settings, args)
    try:
        fatal = serve(settings)
    except StartupError as exc:  # the job store cannot be used
        print(f"reranker: {exc.message}", file=sys.stderr)
        return 2
    if fatal is not None:
        print(f"reranker: model failed to load: {fatal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
