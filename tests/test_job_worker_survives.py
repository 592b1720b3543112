"""No one job can end the job worker: a cancel followed by another job (issue 22's sequence), a
job whose work raises a BaseException or a CancelledError nobody asked for, on both job stores."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from reranker.api.app import create_app
from reranker.backends.base import Encoded, ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.jobs import FINISHED, Job, JobStatus, run_isolated
from tests.conftest import make_settings
from tests.redis_server import RedisServer
from tests.server import ServerThread
from tests.test_jobs import chunks, follow, job_in_the_model

RERANK = {"query": "apple pie recipe", "documents": [f"apple {i} pie and more" for i in range(100)]}


class Panic(BaseException):
    """What a Rust extension's panic looks like from Python (pyo3's PanicException is one)."""


class PanickingBackend(FakeBackend):
    """Tokenizing a text that contains ``panic`` raises a BaseException (on the tokenizer thread)."""

    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        if any("panic" in text for text in texts):
            raise Panic("tokenizer panicked")
        return super().tokenize_texts(texts)


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest) -> Callable[[], dict[str, object]]:
    """The job-store settings of one store (a fresh queue per test on the session's Redis)."""
    if request.param == "local":
        return lambda: {}
    redis: RedisServer = request.getfixturevalue("redis_server")
    queue = f"survive-{uuid.uuid4().hex[:8]}"
    return lambda: {"job_backend": "redis", "redis_url": redis.url, "redis_job_queue": queue}


@pytest.fixture
def served(store: Callable[[], dict[str, object]]) -> Iterator[tuple[ServerThread, FakeBackend]]:
    backend = PanickingBackend(ModelKind.BI_ENCODER)
    with ServerThread(create_app(make_settings(batch_size=8, **store()), backend=backend)) as server:
        yield server, backend


def test_cancel_then_a_bi_encoder_rerank_job_completes_and_the_server_stays_live(served) -> None:
    """Issue 22: cancel a running embed job, then a rerank job embeds its query first: it once read
    the cancelled job's 'still wanted?' callback, was dropped, and the CancelledError ended the worker."""
    server, backend = served
    with server.client() as client:
        first = job_in_the_model(client, backend, 3000)
        assert client.delete(first["status_url"]).status_code == 200
        backend.gate.set()
        assert follow(client, first["job_id"])[-1]["status"] == "CANCELLED"
        second = client.post("/v1/jobs", json={"type": "rerank", "input": RERANK})
        assert second.status_code == 202, second.text
        final = follow(client, second.json()["job_id"])[-1]
        assert final["status"] == "COMPLETED", final
        direct = client.post("/v1/rerank", json=RERANK).json()
        assert final["output"]["results"] == direct["results"]
        assert client.get("/livez").status_code == 200
        assert client.post("/v1/jobs", json={"type": "rerank", "input": RERANK}).status_code == 202


def test_a_base_exception_from_model_code_fails_that_job_only(served) -> None:
    server, _ = served
    with server.client() as client:
        body = {"batch_id": "b", "chunks": [{"chunk_id": "x", "content": "this will panic now"}]}
        job = client.post("/v1/jobs", json={"type": "embed", "input": body}).json()
        final = follow(client, job["job_id"])[-1]
        assert final["status"] == "FAILED" and final["error"]["type"] == "internal_error", final
        assert client.get("/livez").status_code == 200
        after = client.post("/v1/jobs", json={"type": "rerank", "input": RERANK}).json()
        assert follow(client, after["job_id"])[-1]["status"] == "COMPLETED"


async def _two_jobs_in_a_row(jobs, first_raises: BaseException) -> tuple[Job, Job]:
    """Submit two jobs to a started store whose runner raises ``first_raises`` for the first."""
    ran: list[str] = []

    async def runner(job: Job) -> dict[str, object]:
        ran.append(job.id)
        if len(ran) == 1:
            raise first_raises
        return {"ok": True}

    await jobs.start()
    jobs.start_worker(runner)
    try:
        first = await jobs.submit("embed", 1, {"type": "embed", "input": {}}, None)
        second = await jobs.submit("embed", 1, {"type": "embed", "input": {}}, None)
        for _ in range(2000):
            views = [await jobs.get(first.id, None), await jobs.get(second.id, None)]
            if all(view.status in FINISHED for view in views):
                return views[0], views[1]
            await asyncio.sleep(0.01)  # polling the store's observable state, as a client does
        raise TimeoutError("the jobs never finished")
    finally:
        assert jobs.failure is None, jobs.failure
        await jobs.close()


@pytest.mark.parametrize(
    "raised", [asyncio.CancelledError(), Panic("model code panicked"), KeyError("a bug")], ids=type
)
def test_whatever_one_job_raises_fails_that_job_and_the_worker_runs_the_next(
    store: Callable[[], dict[str, object]], raised: BaseException
) -> None:
    from reranker.engine.runtime import job_backend

    first, second = asyncio.run(_two_jobs_in_a_row(job_backend(make_settings(**store())), raised))
    assert first.status is JobStatus.FAILED and first.error["type"] == "internal_error", first
    assert second.status is JobStatus.COMPLETED and second.output == {"ok": True}


def test_stopping_the_worker_cancels_the_running_work_and_ends_the_worker() -> None:
    """The one thing that passes through: the worker's own cancellation (the server stopping)."""

    async def scenario() -> tuple[bool, bool]:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def runner(job: Job) -> dict[str, object]:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()
            return {}

        job = Job(id="j", type="embed", total=1)
        worker = asyncio.ensure_future(run_isolated(job, runner))
        await started.wait()
        worker.cancel()
        results = await asyncio.gather(worker, return_exceptions=True)
        return isinstance(results[0], asyncio.CancelledError), cancelled.is_set()

    assert asyncio.run(scenario()) == (True, True)


def test_a_worker_that_loses_its_lease_drops_that_run_and_goes_on(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another consumer takes the running job's entry (as when this worker stalled past JOB_LEASE_S):
    the worker stops that run at its next slice, takes the next job, and the job itself completes
    once its new holder's lease lapses (here: a consumer that never runs it)."""
    queue = f"lease-{uuid.uuid4().hex[:8]}"
    values = {
        "job_backend": "redis",
        "redis_url": redis_server.url,
        "redis_job_queue": queue,
        "job_lease_s": 1,
    }
    backend = FakeBackend(ModelKind.BI_ENCODER)
    with (
        ServerThread(create_app(make_settings(batch_size=8, **values), backend=backend)) as server,
        server.client() as client,
    ):
        stolen = job_in_the_model(client, backend, 40)
        redis = redis_server.client()
        ((entry_id, _),) = redis.xrange(f"{queue}:stream")
        redis.xclaim(f"{queue}:stream", "workers", "a-stalled-thief", 0, [entry_id], justid=True)
        backend.gate.set()
        nxt = client.post("/v1/jobs", json={"type": "embed", "input": {"batch_id": "n", "chunks": chunks(3)}})
        assert follow(client, nxt.json()["job_id"])[-1]["status"] == "COMPLETED"
        final = follow(client, stolen["job_id"], timeout_s=60)[-1]
        assert final["status"] == "COMPLETED" and len(final["output"]["vectors"]) == 40, final
        assert server.runtime.jobs.failure is None and client.get("/livez").status_code == 200
    assert "another worker took it over" in caplog.text


def test_a_job_that_swallows_the_worker_s_stop_still_stops_the_worker() -> None:
    """Work that catches the cancel passed on to it and returns must not keep the worker running
    (the server's close would then wait for it forever)."""

    async def scenario() -> bool:
        started = asyncio.Event()

        async def runner(job: Job) -> dict[str, object]:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return {"swallowed": True}
            return {}

        worker = asyncio.ensure_future(run_isolated(Job(id="j", type="embed", total=1), runner))
        await started.wait()
        worker.cancel()
        (result,) = await asyncio.gather(worker, return_exceptions=True)
        return isinstance(result, asyncio.CancelledError)

    assert asyncio.run(scenario())
