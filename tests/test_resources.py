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
