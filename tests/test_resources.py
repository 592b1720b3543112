"""CPUs and memory from cgroup files (v2 and v1) and the affinity mask, on fake file trees."""

from __future__ import annotations

from pathlib import Path

from reranker.engine.resources import detect

GIB = 1024**3


def tree(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def resources(root: Path, cpus: int = 16, parallel: int = 1, threads: int = 0):
    return detect(parallel, threads, root=root, affinity=lambda: cpus, host_memory=lambda: 64 * GIB)


def test_cgroup_v2_quota_and_memory_limit_of_a_pod(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        {"kubepods/pod1/ctr/cpu.max": "200000 100000\n", "kubepods/pod1/ctr/memory.max": f"{4 * GIB}\n"},
    )
    found = resources(root)
    assert (found.cpus, found.threads_per_batch, found.memory_bytes) == (2, 2, 4 * GIB)
    assert "quota 2" in found.cpus_because and "cgroup memory limit 4.00 GiB" in found.memory_because


def test_a_fractional_quota_rounds_up_and_parallel_batches_share_the_cpus(tmp_path: Path) -> None:
    root = tree(tmp_path, "0::/\n", {"cpu.max": "350000 100000\n", "memory.max": "max\n"})
    found = resources(root, parallel=2)
    assert (found.cpus, found.threads_per_batch) == (4, 2)
    assert found.memory_bytes == 64 * GIB and "host memory" in found.memory_because


def test_cgroup_v1_limits(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "memory/docker/abc/memory.limit_in_bytes": f"{2 * GIB}\n",
        },
    )
    found = resources(root)
    assert (found.cpus, found.memory_bytes) == (3, 2 * GIB)


def test_no_limits_use_the_affinity_mask_and_the_host(tmp_path: Path) -> None:
    root = tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n", "memory.max": "max\n"})
    found = resources(root, cpus=6, parallel=4)
    assert (found.cpus, found.threads_per_batch, found.memory_bytes) == (6, 1, 64 * GIB)
    assert resources(root, cpus=6, threads=3).threads_per_batch == 3  # INFERENCE_THREADS wins


def test_a_parent_cgroup_limit_applies(tmp_path: Path) -> None:
    root = tree(
        tmp_path, "0::/slice/service\n", {"slice/memory.max": f"{GIB}\n", "slice/cpu.max": "100000 100000"}
    )
    found = resources(root)
    assert (found.cpus, found.memory_bytes) == (1, GIB)


def test_unset_parallel_batches_are_two_halves_of_the_cpus_and_one_on_one_cpu(tmp_path: Path) -> None:
    root = tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n", "memory.max": "max\n"})
    for cpus, parallel, threads in [(1, 1, 1), (2, 2, 1), (3, 2, 1), (16, 2, 8)]:
        found = resources(root, cpus=cpus, parallel=0)
        assert (found.parallel_batches, found.threads_per_batch) == (parallel, threads), cpus
        assert f"{cpus} CPU" in found.parallel_because
    chosen = resources(root, cpus=16, parallel=1)
    assert (chosen.parallel_batches, chosen.threads_per_batch) == (1, 16)
    assert chosen.parallel_because == "MAX_PARALLEL_REQUESTS=1"


def test_the_server_resolves_unset_parallel_batches_once_for_every_model() -> None:
    from reranker.backends.base import ModelKind
    from reranker.backends.fake import FakeBackend
    from reranker.engine.runtime import Runtime
    from tests.conftest import make_settings

    runtime = Runtime(make_settings(max_parallel_requests=0), backend=FakeBackend(ModelKind.BI_ENCODER))
    resolved = runtime.resources.parallel_batches
    assert resolved == (2 if runtime.resources.cpus >= 2 else 1)
    assert runtime.settings.max_parallel_requests == resolved


def test_a_backend_that_cannot_run_batches_concurrently_runs_one_at_a_time() -> None:
    import asyncio

    from reranker.backends.base import ModelKind
    from reranker.backends.fake import FakeBackend
    from reranker.engine.controller import InferenceController
    from reranker.engine.metrics import Metrics

    class OneAtATime(FakeBackend):
        runs_batches_concurrently = False

    async def slots(backend: FakeBackend) -> int:
        made = InferenceController(backend, batch_size=4, max_parallel=2, max_queue=8, metrics=Metrics())
        return made._slots._value

    assert asyncio.run(slots(OneAtATime(ModelKind.BI_ENCODER))) == 1
    assert asyncio.run(slots(FakeBackend(ModelKind.BI_ENCODER))) == 2
