"""Pick and build the backend the settings ask for.

Model runtimes are imported inside the functions, so importing this module
(and everything above it) stays free of torch.
"""

from __future__ import annotations

import logging

from reranker.backends.base import Backend
from reranker.backends.source import ModelSource, resolve_model_source
from reranker.settings import Settings

log = logging.getLogger(__name__)


def preflight(settings: Settings) -> ModelSource:
    """The cheap checks that fail fast: where the model is and what kind it is."""
    return resolve_model_source(settings)


def create_backend(settings: Settings, source: ModelSource | None = None) -> Backend:
    """Load the model (heavy: call it off the event loop)."""
    source = source or preflight(settings)
    if settings.use_mlx:
        log.warning("USE_MLX=true: the MLX backend is not part of this build yet; using torch")
    from reranker.backends.torch_backend import TorchBackend, choose_device

    device = choose_device(settings.device_preference)
    log.info("loading %s (%s) with torch on %s", source.name, source.kind.value, device)
    return TorchBackend(source, device)
