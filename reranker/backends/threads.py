"""The model runtimes' thread pools, sized once per process from the CPUs it really has.

torch sizes its intra-op pool to the node's cores (wrong under a container quota, and
oversubscribed when several batches run at once); ONNX Runtime does the same per session;
the tokenizers library starts one Rayon thread per core, shared by every caller. ``configure``
sets the first two from one number (the ONNX backend reads ``intra_op_threads`` when it creates
its session) and turns the tokenizers' pool off: tokenization.py cuts a large input into one
chunk per idle CPU (one no other encoding holds) on threads of its own, and encodes a small one
on the calling thread, where no other request's work can hold it up.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_configured = {"intra_op": 0, "cpus": 0}


ONEDNN_KERNEL_CACHE = 4096  # compiled oneDNN kernels kept (unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set)


def configure(threads: int, cpus: int = 0) -> None:
    """Intra-op threads of one batch (torch now, ONNX Runtime at session creation) and the CPUs
    this process may use (tokenization spreads over them; 0: the affinity mask)."""
    _configured["intra_op"] = threads
    _configured["cpus"] = cpus
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the tokenizers library at every call
    # oneDNN (torch's CPU kernels) keeps 1,024 compiled kernels by default, one per operation shape.
    # Half-precision batches of up to 32 items padded to multiples of 8 tokens need more: past the
    # capacity every batch recompiled (measured: 1,400 shapes cycled through a bfloat16 Linear took
    # 4 s a pass, against 0.4 s within capacity). Read at oneDNN's first kernel, after this call.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNEL_CACHE))
    try:
        import torch
    except ImportError:  # a backend without torch
        return
    torch.set_num_threads(threads)
    log.info("model threads per batch: %d (torch, ONNX Runtime)", threads)


def intra_op_threads() -> int:
    """The configured intra-op thread count; 0 when ``configure`` was not called (runtime default)."""
    return _configured["intra_op"]


def tokenizer_threads() -> int:
    """Threads tokenization may spread over: the CPUs this process may use, as configured (the
    cgroup quota counted), else as the affinity mask said when first asked (asked per request:
    no system call each time)."""
    if not _configured["cpus"]:
        _configured["cpus"] = affinity_cpus()
    return _configured["cpus"]


def affinity_cpus() -> int:
    """The CPUs the affinity mask lets this process run on (the host's count off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1
