"""Job specs carry a version: a worker runs specs of its own and older formats, refuses newer ones
with a clear error (never a TypeError), and a rerank job answers what /v1/rerank answers, its
details and warnings included."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from reranker.api.app import create_app
from reranker.backends.base import ModelKind
from reranker.backends.fake import FakeBackend
from reranker.engine.job_redis import RedisJobs
from reranker.engine.job_work import SPEC_VERSION, EmbedJob, JobSpecError, RerankJob, work_from_spec
from reranker.engine.service import LongDocuments
from tests.conftest import make_settings
from tests.redis_server import RedisServer
from tests.server import ServerThread
from tests.test_jobs import follow, rerank_job_and_direct

# What the previous format (no "version" key, before return_details) wrote, verbatim.
OLD_EMBED_SPEC = {
    "type": "embed",
    "input": {
        "batch_id": "old",
        "chunk_ids": ["a", "b"],
        "texts": ["apple pie", "pear tart"],
        "normalize": None,
        "truncate": True,
        "model": "fake",
        "prompt": "",
    },
}
OLD_RERANK_SPEC = {
    "type": "rerank",
    "input": {
        "query": "apple pie",
        "texts": ["apple pie recipe", "pear tart"],
        "documents": ["apple pie recipe", "pear tart"],
        "top_n": None,
        "return_documents": False,
        "long": {"mode": "chunk", "max_windows": 10, "overlap": 0, "window": None},
        "instruction": None,
        "raw_scores": False,
    },
}


def test_specs_of_the_previous_format_are_read() -> None:
    assert isinstance(work_from_spec(OLD_EMBED_SPEC), EmbedJob)
    rerank = work_from_spec(OLD_RERANK_SPEC)
    assert isinstance(rerank, RerankJob) and rerank.return_details is False
    assert rerank.long == LongDocuments("chunk", 10, 0, None)


def test_a_spec_is_written_in_the_lowest_format_that_describes_it() -> None:
    plain = work_from_spec(OLD_RERANK_SPEC)
    assert plain.spec() == OLD_RERANK_SPEC  # an older worker runs it unchanged
    detailed = RerankJob(**{**OLD_RERANK_SPEC["input"], "long": plain.long, "return_details": True})
    spec = detailed.spec()
    assert spec["version"] == 2 and spec["input"]["return_details"] is True
    assert work_from_spec(spec) == detailed


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({**OLD_EMBED_SPEC, "version": SPEC_VERSION + 1}, "submitted by a newer reranker"),
        (
            {"type": "embed", "input": {**OLD_EMBED_SPEC["input"], "colour": "red"}},
            "unknown fields ['colour']",
        ),
        ({"type": "summarise", "input": {}}, "type 'summarise'"),
    ],
)
def test_a_spec_this_worker_cannot_run_is_a_clear_error(spec: dict, says: str) -> None:
    with pytest.raises(JobSpecError, match=r".*") as raised:
        work_from_spec(spec)
    assert says in raised.value.message and raised.value.error_type == "job_spec_unsupported"


def test_on_a_shared_queue_a_worker_runs_an_old_spec_and_fails_a_newer_one_clearly(
    redis_server: RedisServer,
) -> None:
    """As in a rolling restart: specs written by another version arrive through Redis."""
    queue = f"specs-{uuid.uuid4().hex[:8]}"
    values = {"job_backend": "redis", "redis_url": redis_server.url, "redis_job_queue": queue}
    backend = FakeBackend(ModelKind.BI_ENCODER)

    async def submit(spec: dict) -> str:
        other_instance = RedisJobs(make_settings(**values))
        await other_instance.start()
        try:
            return (await other_instance.submit(spec["type"], 2, spec, None)).id
        finally:
            await other_instance.close()

    with (
        ServerThread(create_app(make_settings(batch_size=8, **values), backend=backend)) as server,
        server.client() as client,
    ):
        old_embed = follow(client, asyncio.run(submit(OLD_EMBED_SPEC)))[-1]
        old_rerank = follow(client, asyncio.run(submit(OLD_RERANK_SPEC)))[-1]
        newer = follow(client, asyncio.run(submit({**OLD_EMBED_SPEC, "version": SPEC_VERSION + 1})))[-1]
        direct = client.post(
            "/v1/rerank", json={"query": "apple pie", "documents": ["apple pie recipe", "pear tart"]}
        )
        assert client.get("/livez").status_code == 200
    assert old_embed["status"] == "COMPLETED" and len(old_embed["output"]["vectors"]) == 2
    assert old_rerank["status"] == "COMPLETED"
    assert old_rerank["output"]["results"] == direct.json()["results"]
    assert newer["status"] == "FAILED" and newer["error"]["type"] == "job_spec_unsupported", newer
    assert "newer reranker" in newer["error"]["message"]


def test_a_rerank_job_answers_details_and_warnings_as_v1_rerank_does() -> None:
    """Long documents cut, in several slices (the fake backend cuts, it does not chunk): the job's
    output equals the endpoint's."""
    backend = FakeBackend(ModelKind.CROSS_ENCODER, max_length=16)
    words = " ".join(f"w{i}" for i in range(60))
    documents = [f"apple pie {i} " + (words if i % 3 == 0 else "short") for i in range(30)]
    body = {
        "query": "apple pie",
        "documents": documents,
        "return_details": True,
        "return_documents": True,
        "max_chunks_per_doc": 2,
        "top_n": 25,
    }
    output, direct = rerank_job_and_direct(backend, body)
    assert direct["meta"]["warnings"] and any(r["details"]["truncated"] for r in direct["results"])
    assert output["results"] == direct["results"]
    assert output["meta"] == direct["meta"]
    assert output["usage"] == direct["usage"]


def test_the_new_kinds_jobs_are_version_3_and_older_jobs_stay_as_they_were() -> None:
    from reranker.engine.job_work import ClassifyJob, EmbedJob

    plain = work_from_spec(OLD_EMBED_SPEC)
    assert plain.spec() == OLD_EMBED_SPEC and work_from_spec(OLD_RERANK_SPEC).spec() == OLD_RERANK_SPEC
    sparse = EmbedJob(**{**OLD_EMBED_SPEC["input"], "sparse": True, "top_k": 8, "as_query": True})
    assert sparse.spec()["version"] == 3 and work_from_spec(sparse.spec()) == sparse
    labels = ClassifyJob(["a", ["b", "c"]], "m")
    assert labels.spec() == {
        "type": "classify",
        "input": {"inputs": ["a", ["b", "c"]], "model": "m", "raw_scores": False, "truncate": True},
        "version": 3,
    }
    assert work_from_spec(labels.spec()) == labels
