"""What this process may really use: CPUs (affinity and cgroup quota) and memory (cgroup limit).

Inside a container the host's core count and RAM are the wrong numbers: torch sizes its
thread pool to the node's cores and throttles against a 2-CPU quota, and a memory limit
taken from the host's RAM never shrinks batches before the kernel kills the pod. Both
cgroup v2 (``cpu.max``, ``memory.max``) and v1 (``cpu.cfs_quota_us``,
``memory.limit_in_bytes``) are read; ``root`` lets tests point at fake cgroup files.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from reranker.backends.threads import affinity_cpus

UNLIMITED_V1 = 1 << 60  # cgroup v1 reports "no limit" as a huge number


@dataclass(frozen=True, slots=True)
class Resources:
    cpus: int  # CPUs this process can run on at once
    cpus_because: str
    threads_per_batch: int  # intra-op threads of one model batch
    threads_because: str
    parallel_batches: int  # model batches at once (MAX_PARALLEL_REQUESTS, resolved)
    parallel_because: str
    memory_bytes: int  # memory this process may use in all
    memory_because: str

    def view(self) -> dict[str, object]:
        return {
            "cpus": self.cpus,
            "cpus_because": self.cpus_because,
            "threads_per_batch": self.threads_per_batch,
            "threads_because": self.threads_because,
            "parallel_batches": self.parallel_batches,
            "parallel_because": self.parallel_because,
            "memory_limit_bytes": self.memory_bytes,
            "memory_because": self.memory_because,
        }


def detect(
    max_parallel: int,
    threads_setting: int = 0,
    root: Path = Path("/"),
    affinity: Callable[[], int] | None = None,
    host_memory: Callable[[], int] | None = None,
) -> Resources:
    """CPUs, batches at once (``max_parallel`` > 0 wins), threads per batch (``threads_setting``
    > 0 wins) and memory for this process.

    Batches at once, unset: two where the process may use two CPUs or more, each with half of
    them. A batch's threads wait for one another after every operation, so when the event loop,
    the tokenizer or anything else on the machine takes a core from one of them, the whole
    batch waits; a second batch keeps the cores busy meanwhile."""
    cpus, cpus_because = _cpus(root, affinity or affinity_cpus)
    if max_parallel > 0:
        parallel, parallel_because = max_parallel, f"MAX_PARALLEL_REQUESTS={max_parallel}"
    elif cpus >= 2:
        parallel, parallel_because = 2, f"{cpus} CPUs: two batches at once, each with half of them"
    else:
        parallel, parallel_because = 1, "1 CPU: one batch at a time"
    if threads_setting > 0:
        threads, threads_because = threads_setting, f"INFERENCE_THREADS={threads_setting}"
    else:
        threads = max(1, cpus // parallel)
        threads_because = f"{cpus} CPUs / {parallel} batches at once"
    memory, memory_because = _memory(root, host_memory or (lambda: int(psutil.virtual_memory().total)))
    return Resources(
        cpus, cpus_because, threads, threads_because, parallel, parallel_because, memory, memory_because
    )


def _cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """Directories whose limits apply to this process: its own cgroup and its ancestors, v2 and v1."""
    dirs: list[Path] = []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        base = root / "sys/fs/cgroup"
        if controllers == "":  # v2 unified hierarchy
            pass
        elif controller in controllers.split(","):
            base = base / controllers
        else:
            continue
        current = Path(path.strip() or "/")
        while True:
            dirs.append(base / str(current).lstrip("/"))
            if current == current.parent:
                break
            current = current.parent
    dirs.append(root / "sys/fs/cgroup")  # a container's namespace root
    dirs.append(root / "sys/fs/cgroup" / controller)
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpus(root: Path, affinity: Callable[[], int]) -> tuple[int, str]:
    count = affinity()
    quota: float | None = None
    for directory in _cgroup_dirs(root, "cpu"):
        value = _read(directory / "cpu.max")
        if value is not None:
            limit, _, period = value.partition(" ")
            if limit != "max" and period:
                quota = min(quota or math.inf, int(limit) / int(period))
        v1_quota, v1_period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if v1_quota and v1_period and int(v1_quota) > 0:
            quota = min(quota or math.inf, int(v1_quota) / int(v1_period))
    if quota is not None and math.ceil(quota) < count:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g} (of {count} CPUs in the affinity mask)"
    return count, f"{count} CPUs in the affinity mask"


def _memory(root: Path, host_memory: Callable[[], int]) -> tuple[int, str]:
    host = host_memory()
    limit: int | None = None
    for directory in _cgroup_dirs(root, "memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            value = _read(directory / name)
            if value and value != "max" and value.isdigit() and int(value) < UNLIMITED_V1:
                limit = min(limit or int(value), int(value))
    if limit is not None and limit < host:
        return limit, f"cgroup memory limit {limit / 2**30:.2f} GiB (host has {host / 2**30:.2f} GiB)"
    return host, f"host memory {host / 2**30:.2f} GiB (no lower cgroup limit)"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        return None
    return libc


def trim_allocator() -> bool:
    """Hand the memory glibc's malloc keeps cached in its arenas back to the system.

    After a burst of big requests (a 10 MB body, its tokenization, activations of large
    batches) the freed blocks stay in the arenas and RSS stays high; ``malloc_trim`` returns
    them. False where there is no glibc.
    """
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
