"""RunPod's serverless routes: POST /run, POST /runsync, GET /status/{id}, POST /cancel/{id}.

A client written for a RunPod endpoint (``https://api.runpod.ai/v2/ENDPOINT_ID``) works
against this server with its base URL changed. The body is ``{"input": {...}}`` where
``input`` is the body of /embed (``batch_id``, ``chunks``) or of /v1/rerank (``query``,
``documents``); it becomes a /v1/jobs job of that type through the same ``accept_job``,
so it is validated completely at submission and runs like any job. Status is RunPod's
shape: ``{"id", "status", "delayTime"?, "executionTime"?, "output"?, "error"?}``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_json, unless_disconnected
from reranker.api.jobs import accept_job, cancel_job_for, find_job
from reranker.api.observe import model_of, runtime_of
from reranker.api.responses import json_response
from reranker.engine.jobs import FINISHED, Job, JobStatus
from reranker.engine.runtime import Status
from reranker.errors import InvalidInputError, JobStoreError

RUNPOD_STATUS = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.IN_PROGRESS: "IN_PROGRESS",
    JobStatus.COMPLETED: "COMPLETED",
    JobStatus.FAILED: "FAILED",
    JobStatus.CANCELLED: "CANCELLED",
}
EXPECTED_INPUT = (
    'an embed input {"batch_id", "chunks": [{"chunk_id", "content"}]} '
    'or a rerank input {"query", "documents"} or a classify input {"inputs": [text | [text, text]]}'
)
# /runsync reads the job's state this often (the job may run on another instance, so there is
# nothing in this process to await): from FIRST_POLL_S, doubling up to MAX_POLL_S.
FIRST_POLL_S = 0.005
MAX_POLL_S = 0.25


def job_body(data: object) -> dict[str, Any]:
    """RunPod's ``{"input": {...}}`` as the ``{"type", "input"}`` body of /v1/jobs."""
    if not isinstance(data, dict) or not isinstance(data.get("input"), dict):
        raise InvalidInputError(f'body: expected {{"input": {{...}}}} holding {EXPECTED_INPUT}')
    given: dict[str, Any] = data["input"]
    if "chunks" in given and "query" not in given:
        return {"type": "embed", "input": given}
    if "inputs" in given and "query" not in given and "chunks" not in given:
        return {"type": "classify", "input": given}
    if "query" in given and "chunks" not in given:
        return {"type": "rerank", "input": given}
    raise InvalidInputError(f"input: expected {EXPECTED_INPUT}; got the fields {sorted(given)}")


def runpod_view(job: Job) -> dict[str, Any]:
    """The job in RunPod's shape; times in milliseconds, as RunPod gives them (never negative:
    in a cluster, submission and start may be stamped by two machines' clocks)."""
    body: dict[str, Any] = {"id": job.id, "status": RUNPOD_STATUS[job.status]}
    if job.started_at is not None:
        body["delayTime"] = max(0, round((job.started_at - job.created_at) * 1000))
        if job.finished_at is not None:
            body["executionTime"] = max(0, round((job.finished_at - job.started_at) * 1000))
    if job.output is not None:
        body["output"] = job.output
    if job.error is not None:
        body["error"] = job.error["message"]
        body["error_type"] = job.error["type"]
    return body


async def _submit(request: Request) -> Job:
    settings = runtime_of(request).settings
    data = await read_json(request, settings.max_job_request_bytes, settings.body_read_timeout_s)
    body = job_body(data)
    if body["type"] == "embed":  # RunPod's input has no type: a sparse model's embed is embed_sparse
        requested = body["input"].get("model")
        model = model_of(
            request, requested if isinstance(requested, str) else None, ("embed", "embed_sparse")
        )
        if model.info is not None and model.info.strategy.serves("embed_sparse"):
            body["type"] = "embed_sparse"
    return await accept_job(request, body)


async def run(request: Request) -> Response:
    """Queue the job; answer at once with its id (poll GET /status/{id})."""
    job = await _submit(request)
    return await json_response(runpod_view(job))


async def runsync(request: Request) -> Response:
    """Queue the job and wait up to RUNSYNC_WAIT_S for it: its result, or its id to poll."""
    job = await _submit(request)
    finished = await unless_disconnected(request, _wait_finished(request, job))
    return await json_response(runpod_view(finished))


async def _wait_finished(request: Request, job: Job) -> Job:
    """The job once finished, or as it last stood after RUNSYNC_WAIT_S, when this server drains
    or when the job store stops answering: the job is queued, so the client gets its id to poll
    (never an error it would answer by submitting the job again)."""
    runtime = runtime_of(request)
    deadline = time.monotonic() + runtime.settings.runsync_wait_s
    pause = FIRST_POLL_S
    while job.status not in FINISHED:
        left = deadline - time.monotonic()
        if left <= 0 or runtime.status is Status.DRAINING:
            break
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, MAX_POLL_S)
        try:
            job = await find_job(request, job.id)
        except JobStoreError:
            break
    return job


async def status(request: Request) -> Response:
    job = await find_job(request, request.path_params["id"])
    return await json_response(runpod_view(job))


async def cancel(request: Request) -> Response:
    """Cancel a queued job (CANCELLED) or a running one (IN_PROGRESS until it stops at its next
    slice, then CANCELLED). A finished job is left as it is, its result kept (as RunPod does)."""
    job = await cancel_job_for(request, request.path_params["id"], delete_finished=False)
    return await json_response(runpod_view(job))
