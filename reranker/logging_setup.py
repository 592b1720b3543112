"""Logging configuration for the server process."""

from __future__ import annotations

import logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT, force=True)
    # Libraries' progress bars and load reports are noise in a server log.
    for noisy in ("transformers", "sentence_transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
