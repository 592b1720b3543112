"""Random sequences of job operations (hypothesis' RuleBasedStateMachine) against a real server.

Each run starts a server on a fake model that records every batch, then applies a random sequence
of: submit an embed or rerank job (small, or sliced into many batches; through /v1/jobs or RunPod's
/run), /runsync, cancel (DELETE /v1/jobs/{id} or POST /cancel/{id}), poll, hold and release the
model (so cancels land on queued and running jobs, not only on finished ones), a synchronous
request, and an instance restart on the same store. Both stores (local with JOB_STORE_DIR, Redis),
a bi-encoder and a cross-encoder.

After every step: the server is live; a finished job never changes status; a refused submission
(429) means MAX_ACTIVE_JOBS jobs were unfinished. At the end (the model released): every job
reaches a finished state within a bound; a COMPLETED job's output equals what the synchronous
endpoint answers for its input (a second server on its own fake model); once a job was seen
CANCELLED no batch carrying its items runs; a job that no restart interrupted ran each of its
items exactly once (never twice to completion); no job is lost (404) unless deleted; no job is
left counted against MAX_ACTIVE_JOBS.

Every job's texts carry a marker word of its own, so the recorded batches say which job they
served. A failing sequence is printed by hypothesis (with the blob to reproduce it); keep it as
an explicit test beside tests/test_job_worker_survives.py (issue 22's sequence is one).
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis as redis_client
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from reranker.api.app import create_app
from reranker.backends.base import Encoded, ModelKind
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.server import ServerThread

MAX_ACTIVE = 3
FINISHED = {"COMPLETED", "FAILED", "CANCELLED"}
SIZES = [1, 5, 60]  # one item, one batch, many slices (BATCH_SIZE=8)
EXAMPLES = 20  # per (store, kind): 4 x 20 runs of up to 20 steps each CI run (about a minute)
STEPS = 20
FINISH_WITHIN_S = 60.0


def token_of(word: str) -> int:
    return zlib.crc32(word.encode()) % 30000 + 1  # the fake tokenizer's id of a word


BASE_WORDS = {"apple", "pie", "text", "about", "topic", "document", "and", "recipe"}
BASE_WORDS |= {f"t{i}" for i in range(max(SIZES))} | {f"k{i}" for i in range(7)}
BASE_IDS = {token_of(word) for word in BASE_WORDS}


class RecordingBackend(FakeBackend):
    """The fake model, recording the token ids of every item of every batch it runs, in order."""

    def __init__(self, kind: ModelKind) -> None:
        super().__init__(kind)
        self.items: list[list[frozenset[int]]] = []

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        with self._lock:
            self.items.append([frozenset(item.ids) for item in batch])
        return super().forward(batch)

    def runs_of(self, marker: int, since: int = 0) -> int:
        """Items carrying ``marker`` in the batches from index ``since`` on."""
        with self._lock:
            return sum(marker in item for batch in self.items[since:] for item in batch)

    @property
    def batch_count(self) -> int:
        with self._lock:
            return len(self.items)


@dataclass
class Tracked:
    id: str
    type: str
    body: dict
    marker: int
    size: int
    seen: str = "QUEUED"
    deleted: bool = False
    interrupted: bool = False  # a restart happened while it was unfinished
    cancelled_at_batch: int | None = None  # batch count when first seen CANCELLED
    output: dict | None = None
    query_embedded: bool = False  # a bi-encoder rerank embeds its query once, before its slices

    @property
    def items(self) -> int:
        """What one run of it puts through the model."""
        return self.size + 1 if self.query_embedded else self.size


def embed_body(marker: str, size: int) -> dict:
    chunks = [
        {"chunk_id": f"c{i}", "content": f"{marker} text t{i} about topic k{i % 7}"} for i in range(size)
    ]
    return {"batch_id": marker, "chunks": chunks}


def rerank_body(marker: str, size: int) -> dict:
    documents = [f"{marker} document t{i} apple pie k{i % 7}" for i in range(size)]
    return {"query": f"{marker} apple pie recipe", "documents": documents, "return_documents": True}


def runpod_status(status: str) -> str:
    return {"IN_QUEUE": "QUEUED"}.get(status, status)


class JobSequences(RuleBasedStateMachine):
    """Configured per (store, kind) by ``machine_for``."""

    store = "local"
    kind = ModelKind.BI_ENCODER
    redis_url = ""
    tmp: Path = Path()
    reference: ServerThread | None = None
    markers = itertools.count()
    seen: collections.Counter[str] = collections.Counter()  # what the runs of one test did, printed

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.backend = RecordingBackend(self.kind)
        self.store_dir = self.tmp / uuid.uuid4().hex
        self.queue = f"machine-{uuid.uuid4().hex[:8]}"
        self.tracked: dict[str, Tracked] = {}
        self.paused = False
        self.restarts = 0
        self.server: ServerThread | None = None
        self.client: httpx.Client | None = None

    # ---- the instance -------------------------------------------------------------------

    def _settings(self) -> dict[str, object]:
        values: dict[str, object] = {
            "batch_size": 8,
            "max_active_jobs": MAX_ACTIVE,
            "runsync_wait_s": 10,
            "enable_prediction_cache": False,
            "job_lease_s": 2,
        }
        if self.store == "redis":
            return {
                **values,
                "job_backend": "redis",
                "redis_url": self.redis_url,
                "redis_job_queue": self.queue,
            }
        return {**values, "job_store_dir": str(self.store_dir)}

    def _start(self) -> None:
        self.server = ServerThread(
            create_app(make_settings(**self._settings()), backend=self.backend)
        ).start()
        assert self.server.runtime.status.value == "healthy", self.server.runtime.error
        self.client = httpx.Client(base_url=self.server.url, timeout=30)

    def _stop(self) -> None:
        self._release_model()
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()

    @initialize(held=st.booleans())
    def boot(self, held: bool) -> None:
        self._start()
        if held:  # half the runs begin with the model held: jobs queue up and run slowly
            self.hold_model()

    def teardown(self) -> None:
        try:
            if self.server is not None:
                self._release_model()
                self._check_the_end()
        finally:
            self._stop()

    # ---- rules ------------------------------------------------------------------------

    def _new_marker(self) -> tuple[str, int]:
        while True:
            word = f"mark{next(self.markers)}x"
            marker = token_of(word)
            if marker not in BASE_IDS and all(marker != job.marker for job in self.tracked.values()):
                return word, marker

    def _unfinished(self) -> int:
        return sum(1 for job in self.tracked.values() if job.seen not in FINISHED and not job.deleted)

    @rule(
        target=jobs,
        job_type=st.sampled_from(["embed", "rerank"]),
        size=st.sampled_from(SIZES),
        route=st.sampled_from(["/v1/jobs", "/run"]),
    )
    def submit(self, job_type: str, size: int, route: str) -> Tracked | None:
        word, marker = self._new_marker()
        body = embed_body(word, size) if job_type == "embed" else rerank_body(word, size)
        payload = {"type": job_type, "input": body} if route == "/v1/jobs" else {"input": body}
        response = self.client.post(route, json=payload)
        if job_type == "embed" and self.kind is ModelKind.CROSS_ENCODER:
            assert response.status_code == 400, response.text  # a cross-encoder cannot embed
            return None
        if response.status_code == 429:
            assert self._unfinished() >= MAX_ACTIVE, (self._unfinished(), response.text)
            self.seen["refused for MAX_ACTIVE_JOBS"] += 1
            return None
        assert response.status_code in (200, 202), response.text
        answer = response.json()
        return self._track(answer.get("job_id") or answer["id"], job_type, body, marker, size)

    def _track(self, job_id: str, job_type: str, body: dict, marker: int, size: int) -> Tracked:
        embedded = job_type == "rerank" and self.kind is ModelKind.BI_ENCODER
        job = Tracked(job_id, job_type, body, marker, size, query_embedded=embedded)
        self.tracked[job_id] = job
        return job

    @precondition(lambda self: not self.paused)
    @rule(size=st.sampled_from(SIZES))
    def runsync(self, size: int) -> None:
        word, marker = self._new_marker()
        body = rerank_body(word, size)
        response = self.client.post("/runsync", json={"input": body})
        if response.status_code == 429:
            assert self._unfinished() >= MAX_ACTIVE
            return
        assert response.status_code == 200, response.text
        answer = response.json()
        job = self._track(answer["id"], "rerank", body, marker, size)
        self._saw(job, runpod_status(answer["status"]), answer.get("output"))

    @precondition(lambda self: self.tracked)  # only the machine's own state: hypothesis replays it
    @rule(route=st.sampled_from(["DELETE /v1/jobs", "POST /cancel"]))
    def cancel_the_newest(self, route: str) -> None:
        """What a user does most: submit, then think better of it."""
        self.cancel(list(self.tracked.values())[-1], route)

    @rule(job=jobs, route=st.sampled_from(["DELETE /v1/jobs", "POST /cancel"]))
    def cancel(self, job: Tracked | None, route: str) -> None:
        if job is None or job.deleted:
            return
        before = self.client.get(f"/v1/jobs/{job.id}")
        assert before.status_code == 200, before.text
        self._saw(job, before.json()["status"], before.json().get("output"))
        self.seen[f"cancel of a {job.seen} job"] += 1
        if route == "POST /cancel":
            response = self.client.post(f"/cancel/{job.id}")
            assert response.status_code == 200, response.text
            self._saw(job, runpod_status(response.json()["status"]), response.json().get("output"))
            return
        response = self.client.delete(f"/v1/jobs/{job.id}")
        assert response.status_code == 200, response.text
        # A queued job is cancelled, a running one stops at its next slice, a finished one is deleted
        # with its result; which happened shows on the next read.
        after = self.client.get(f"/v1/jobs/{job.id}")
        if after.status_code == 404:
            assert response.json()["status"] in FINISHED, response.text
            self._saw(job, response.json()["status"], None)
            job.deleted = True
        else:
            assert after.status_code == 200, after.text
            self._saw(job, after.json()["status"], after.json().get("output"))

    @rule(job=jobs)
    def poll(self, job: Tracked | None) -> None:
        if job is None:
            return
        response = self.client.get(f"/v1/jobs/{job.id}")
        if job.deleted:
            assert response.status_code == 404, response.text
            return
        assert response.status_code == 200, response.text  # never lost
        self._saw(job, response.json()["status"], response.json().get("output"))

    @precondition(lambda self: not self.paused)
    @rule()
    def hold_model(self) -> None:
        self.backend.gate.clear()
        self.paused = True

    @precondition(lambda self: self.paused)
    @rule()
    def release_model(self) -> None:
        self._release_model()

    @precondition(lambda self: not self.paused)
    @rule(size=st.sampled_from(SIZES[:2]))
    def synchronous_request(self, size: int) -> None:
        word, _ = self._new_marker()
        if self.kind is ModelKind.BI_ENCODER:
            response = self.client.post("/embed", json=embed_body(word, size))
            expected = self._reference("embed", embed_body(word, size))
            assert response.status_code == 200, response.text
            assert _vectors(response.json()) == pytest.approx(_vectors(expected), abs=1e-6)
        else:
            response = self.client.post("/v1/rerank", json=rerank_body(word, size))
            assert response.status_code == 200, response.text
            assert response.json()["results"] == self._reference("rerank", rerank_body(word, size))["results"]

    @precondition(lambda self: self.restarts < 2)
    @rule()
    def restart_instance(self) -> None:
        for job in self.tracked.values():
            if job.seen not in FINISHED:
                job.interrupted = True
        self._stop()
        self.restarts += 1
        self.seen["restarts"] += 1
        self._start()

    # ---- invariants -------------------------------------------------------------------

    @invariant()
    def live(self) -> None:
        if self.client is not None:
            response = self.client.get("/livez")
            assert response.status_code == 200, response.text
            assert self._active() <= MAX_ACTIVE, "more jobs active than MAX_ACTIVE_JOBS"

    # ---- bookkeeping ------------------------------------------------------------------

    def _release_model(self) -> None:
        self.backend.gate.set()
        self.paused = False

    def _saw(self, job: Tracked, status: str, output: dict | None) -> None:
        assert status in FINISHED | {"QUEUED", "IN_PROGRESS"}, status
        if job.seen in FINISHED:
            assert status == job.seen, f"job {job.id} was {job.seen}, now {status}"
        if status == "CANCELLED" and job.cancelled_at_batch is None:
            job.cancelled_at_batch = self.backend.batch_count
        if output is not None:
            job.output = output
        job.seen = status

    def _reference(self, job_type: str, body: dict) -> dict:
        route = "/embed" if job_type == "embed" else "/v1/rerank"
        with self.reference.client() as client:
            response = client.post(route, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def _check_the_end(self) -> None:
        deadline = time.monotonic() + FINISH_WITHIN_S
        for job in self.tracked.values():
            while not job.deleted and job.seen not in FINISHED:
                assert time.monotonic() < deadline, f"job {job.id} never finished ({job.seen})"
                response = self.client.get(f"/v1/jobs/{job.id}")
                assert response.status_code == 200, response.text
                self._saw(job, response.json()["status"], response.json().get("output"))
                if job.seen not in FINISHED:
                    time.sleep(0.02)  # polling the observable state, as a client does
            self.seen["jobs deleted" if job.deleted else f"jobs {job.seen}"] += 1
            if job.deleted:
                continue
            if job.seen == "COMPLETED" and job.output is None:
                job.output = self.client.get(f"/v1/jobs/{job.id}").json()["output"]
            self._check_job(job)
        self._check_nothing_active()

    def _check_job(self, job: Tracked) -> None:
        if job.seen == "COMPLETED":
            expected = self._reference(job.type, job.body)
            if job.type == "embed":
                assert _vectors(job.output) == pytest.approx(_vectors(expected), abs=1e-6)
                assert job.output["usage"] == expected["usage"]
            else:  # the whole answer, but its id
                assert {**job.output, "id": None} == {**expected, "id": None}
            if not job.interrupted:
                assert self.backend.runs_of(job.marker) == job.items, "ran more than once"
        if job.cancelled_at_batch is not None:
            assert self.backend.runs_of(job.marker, since=job.cancelled_at_batch) == 0, "ran after CANCELLED"
        if job.seen == "FAILED":
            assert job.interrupted, f"job {job.id} failed without a restart"

    def _active(self) -> int:
        """The jobs counted against MAX_ACTIVE_JOBS, as the store counts them."""
        if self.store == "redis":
            return redis_client.Redis.from_url(self.redis_url).scard(f"{self.queue}:active")
        return self.client.get("/health").json()["jobs"]["active"]

    def _check_nothing_active(self) -> None:
        active = self._active()
        assert active == 0, f"{active} jobs still counted against MAX_ACTIVE_JOBS"


def _vectors(body: dict) -> list[float]:
    return np.concatenate([np.asarray(v["vector"]) for v in body["vectors"]]).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind", [ModelKind.BI_ENCODER, ModelKind.CROSS_ENCODER], ids=lambda k: k.value)
@pytest.mark.parametrize("store", ["local", "redis"])
def test_random_sequences_of_job_operations(
    store: str, kind: ModelKind, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis_url = request.getfixturevalue("redis_server").url if store == "redis" else ""
    reference_settings = make_settings(batch_size=8, enable_prediction_cache=False)
    with ServerThread(create_app(reference_settings, backend=FakeBackend(kind))) as reference:
        machine = type(
            f"JobSequences_{store}_{kind.name}",
            (JobSequences,),
            {"store": store, "kind": kind, "redis_url": redis_url, "tmp": tmp_path, "reference": reference},
        )
        machine.seen = collections.Counter()
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                print_blob=True,
                suppress_health_check=list(HealthCheck),
            ),
        )
    print(
        f"\n{store} {kind.value}: {EXAMPLES} runs of up to {STEPS} steps:", dict(sorted(machine.seen.items()))
    )
    assert machine.seen["jobs COMPLETED"], machine.seen  # what the runs covered varies: printed above
