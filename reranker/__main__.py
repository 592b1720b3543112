"""``python -m reranker``: settings from the environment and flags, then serve.

Every setting is also a flag: ``BATCH_SIZE`` is ``--batch-size``. Configuration
errors end the process with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from reranker import __version__
from reranker.api.app import create_app
from reranker.backends.factory import preflight
from reranker.errors import StartupError
from reranker.logging_setup import configure_logging
from reranker.protocol import uvicorn_config
from reranker.serve import DrainingServer
from reranker.settings import Settings, env_name, load_settings

log = logging.getLogger("reranker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reranker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument(
        "--reload",
        action="store_true",
        help="development: restart on code change (settings from the environment only)",
    )
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=env_name(name),
            help=f"(env {env_name(name)}, default {field.default!r})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    reload = args.pop("reload")
    try:
        settings = load_settings(overrides=args)
        configure_logging(settings.log_level, settings.log_format)
        source = preflight(settings)
    except StartupError as exc:
        print(f"reranker: {exc.message}", file=sys.stderr)
        return 2
    log.info("model %s (%s) from %s", source.name, source.kind.value, source.path)
    if reload:
        uvicorn.run(
            "reranker.api.app:app_from_environment",
            factory=True,
            reload=True,
            reload_dirs=[str(Path(__file__).parent)],
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
        )
        return 0

    fatal: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app.state.runtime, settings.shutdown_timeout_s)
    server.run()
    if fatal:
        message = fatal[0].message if isinstance(fatal[0], StartupError) else str(fatal[0])
        print(f"reranker: model failed to load: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
