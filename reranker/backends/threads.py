"""The model runtimes' thread pools, sized once per process from the CPUs it really has.

torch sizes its intra-op pool to the node's cores (wrong under a container quota, and
oversubscribed when several batches run at once); ONNX Runtime does the same per session;
the tokenizers library starts one Rayon thread per core. ``configure`` sets all three from
one number; the ONNX backend reads ``intra_op_threads`` when it creates its session.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_configured = {"intra_op": 0}


def configure(threads: int) -> None:
    """Intra-op threads of one batch (torch now, ONNX Runtime at session creation, tokenizers)."""
    _configured["intra_op"] = threads
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # read when tokenizers starts its pool
    try:
        import torch
    except ImportError:  # a backend without torch
        return
    torch.set_num_threads(threads)
    log.info("model threads per batch: %d (torch, ONNX Runtime, tokenizers)", threads)


def intra_op_threads() -> int:
    """The configured intra-op thread count; 0 when ``configure`` was not called (runtime default)."""
    return _configured["intra_op"]
