"""Faults made for real where this machine allows: a job store on a tmpfs that fills up, Redis
restarted mid-job, and the local store's writer SIGKILLed at random moments mid-write. In each,
nothing acknowledged is lost and the server goes on."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.job_local import JobStore
from reranker.engine.jobs import JobStatus
from tests.conftest import make_settings
from tests.redis_server import RedisServer
from tests.server import ServerThread
from tests.test_jobs import chunks, follow


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for the test (needs root; skipped with the reason otherwise)."""
    target = tmp_path / "jobs"
    target.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(target)], check=False)
    if mounted.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs (no CAP_SYS_ADMIN)")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of ``directory`` until about ``leave_bytes`` are free."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb") as out:
        out.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_a_job_store_that_fills_up_fails_that_job_and_the_next_job_runs(small_tmpfs: Path) -> None:
    backend = FakeBackend(ModelKind.BI_ENCODER)
    settings = make_settings(batch_size=8, job_store_dir=str(small_tmpfs))
    with ServerThread(create_app(settings, backend=backend)) as server, server.client() as client:
        filler = fill(small_tmpfs, leave_bytes=16 * 1024)  # room for records, not for a big result
        big = {"type": "embed", "input": {"batch_id": "big", "chunks": chunks(400)}}
        accepted = client.post("/v1/jobs", json=big)
        assert accepted.status_code == 202, accepted.text
        failed = follow(client, accepted.json()["job_id"])[-1]
        assert failed["status"] == "FAILED" and failed["error"]["type"] == "job_store_error", failed
        assert "No space left" in failed["error"]["message"]
        small = {"type": "embed", "input": {"batch_id": "small", "chunks": chunks(2)}}
        after = follow(client, client.post("/v1/jobs", json=small).json()["job_id"])[-1]
        assert after["status"] == "COMPLETED", after
        filler.unlink()  # space again: the big job runs
        again = follow(client, client.post("/v1/jobs", json=big).json()["job_id"])[-1]
        assert again["status"] == "COMPLETED" and len(again["output"]["vectors"]) == 400
        assert client.get("/livez").status_code == 200
        assert client.get("/health").json()["jobs"]["quarantined"] == []


def test_redis_restarted_mid_job_loses_no_acknowledged_job(tmp_path: Path) -> None:
    """A durable Redis (append-only file, fsync always, as DEPLOYMENT.md advises) killed while one
    job runs and four wait, then started again: every job the server acknowledged completes, with
    the output the synchronous endpoint gives."""
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    backend = FakeBackend(ModelKind.BI_ENCODER)
    with RedisServer(tmp_path / "redis", durable=True) as redis:
        values = {"job_backend": "redis", "redis_url": redis.url, "redis_job_queue": queue}
        values |= {"job_lease_s": 1, "max_active_jobs": 8}
        with (
            ServerThread(create_app(make_settings(batch_size=8, **values), backend=backend)) as server,
            server.client() as client,
        ):
            backend.gate.clear()
            backend.batch_started.clear()
            bodies = [{"batch_id": f"b{i}", "chunks": chunks(24 + i, prefix=f"job{i}")} for i in range(5)]
            ids = []
            for body in bodies:
                accepted = client.post("/v1/jobs", json={"type": "embed", "input": body})
                assert accepted.status_code == 202, accepted.text
                ids.append(accepted.json()["job_id"])
            assert backend.batch_started.wait(30)  # the first job is in the model
            redis.kill()
            server.wait_until(lambda: client.get("/health").json()["status"] == "degraded", "degraded", 30)
            backend.gate.set()  # the job's batches finish while Redis is away
            redis.start()
            finals = [follow(client, job_id, timeout_s=120)[-1] for job_id in ids]
            directs = [client.post("/embed", json=body).json() for body in bodies]
            assert client.get("/health").json()["status"] == "healthy"
    for final, direct in zip(finals, directs, strict=True):
        assert final["status"] == "COMPLETED", final
        vectors = np.array([v["vector"] for v in final["output"]["vectors"]])
        assert np.allclose(vectors, [v["vector"] for v in direct["vectors"]], atol=1e-6)


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from reranker.engine.job_local import JobStore
    from reranker.engine.jobs import Job, JobStatus

    store = JobStore(Path(sys.argv[1]))
    store.open()
    start = int(sys.argv[2])
    for n in range(start, start + 100000):
        job = Job(id=f"job{n:06d}", type="embed", total=n % 50)
        job.status = JobStatus.COMPLETED
        job.output = {"n": n, "vectors": [[n / 7.0] * 64 for _ in range(n % 50)]}
        store.save(job)
        print(job.id, flush=True)  # acknowledged: save returned
    """
)


def test_the_local_store_sigkilled_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A writer saving records and results in a loop, SIGKILLed at random moments 25 times: after
    each kill the store opens, every job whose save had returned is there and whole, and whatever
    the kill left half-written is quarantined, never read as a job."""
    directory = tmp_path / "jobs"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(20261203)
    acknowledged: list[str] = []
    quarantined = 0
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for round_ in range(25):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(directory), str(round_ * 100000)],
            stdout=subprocess.PIPE,
            env=environment,
        )
        first = writer.stdout.readline()  # it writes now
        assert first, "the writer never saved a job"
        time.sleep(rng.uniform(0.0, 0.05))  # a random moment within its writes (the fault, not a wait)
        writer.send_signal(signal.SIGKILL)
        rest, _ = writer.communicate(timeout=30)
        acknowledged += [first.decode().strip(), *rest.decode().split()]
        store = JobStore(directory)
        store.open()
        try:
            jobs = {job.id: job for job in store.load()}
            quarantined += len(store.quarantined)
            for job_id in acknowledged:
                assert job_id in jobs, f"{job_id} was acknowledged and is lost"
                assert jobs[job_id].status is JobStatus.COMPLETED
                output = store.read_output(job_id)
                n = int(job_id[3:])
                assert output["n"] == n and len(output["vectors"]) == n % 50
        finally:
            store.close()
    print(f"\n25 SIGKILLs: {len(acknowledged)} acknowledged jobs intact, {quarantined} leftovers quarantined")
