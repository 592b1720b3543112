"""POST /v1/jobs, GET /v1/jobs/{job_id}, DELETE /v1/jobs/{job_id}: asynchronous embed and rerank.

The input is validated as its endpoint would validate it (the same pydantic models and
character limits) before the job is accepted, so a job fails later only for reasons the
model gives. Bigger than a request: up to MAX_TEXTS_PER_JOB texts in a body of up to
MAX_JOB_REQUEST_BYTES. With truncation off (``truncate: false`` to embed, ``"NONE"`` to
rerank) every text is tokenized at submission, and one too long is a 422 naming it. With
API_KEYS a job belongs to the key that created it: another key gets 404.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_json, validate
from reranker.api.observe import model_of, runtime_of
from reranker.api.rerank import long_documents
from reranker.api.responses import ORJSONResponse, json_response
from reranker.api.schemas import ClassifyJobInput, CohereRerankRequest, EmbedRequest, JobRequest
from reranker.api.text_limits import document_tokens, fit_inputs, fit_rerank, fit_texts
from reranker.engine.job_work import JOB_CAPABILITY, ClassifyJob, EmbedJob, RerankJob
from reranker.engine.jobs import Job
from reranker.engine.service import InferenceService
from reranker.errors import InvalidInputError, PayloadTooLargeError, UnsupportedOperationError
from reranker.settings import Settings


async def submit_job(request: Request) -> Response:
    runtime = runtime_of(request)
    data = await read_json(
        request, runtime.settings.max_job_request_bytes, runtime.settings.body_read_timeout_s
    )
    job = await accept_job(request, data)
    status_url = f"/v1/jobs/{job.id}"
    content = {"job_id": job.id, "status": job.status.value, "status_url": status_url}
    return ORJSONResponse(content, status_code=202, headers={"Location": status_url})


async def accept_job(request: Request, data: object) -> Job:
    """Validate a ``{"type": "embed" | "rerank", "input": {...}}`` body completely and queue it.

    The one way in for every job route (``/v1/jobs``, RunPod's ``/run`` and ``/runsync``).
    """
    runtime = runtime_of(request)
    job_input = data.get("input") if isinstance(data, dict) else None
    requested = job_input.get("model") if isinstance(job_input, dict) else None
    job_type = data.get("type") if isinstance(data, dict) else None
    capability = JOB_CAPABILITY.get(str(job_type), "rerank")
    model = model_of(request, requested if isinstance(requested, str) else None, capability)
    service = model.require_service()
    # Validating (and, without truncation, tokenizing) 200,000 chunks is work: off the event loop.
    job_type, total, work = await asyncio.to_thread(_job_work, data, runtime.settings, service, model.name)
    spec = work.spec() | {"model": model.name}  # the worker runs it on this model, or fails it
    return await runtime.jobs.submit(job_type, total, spec, owner_of(request))


async def find_job(request: Request, job_id: str) -> Job:
    """The job ``job_id`` as the caller may see it; NotFoundError otherwise (another key's job too)."""
    return await runtime_of(request).jobs.get(job_id, owner_of(request))


async def cancel_job_for(request: Request, job_id: str, delete_finished: bool = True) -> Job:
    """Cancel a queued or running job (it stops before its next slice); delete a finished one."""
    return await runtime_of(request).jobs.cancel(job_id, owner_of(request), delete_finished)


def owner_of(request: Request) -> str | None:
    """Who owns the jobs this request creates or sees: a digest of its API key (keys on), else None.
    Only the digest is stored; authentication already checked the key."""
    if request.app.state.api_keys is None:
        return None
    presented = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(b"reranker-job-owner:" + presented.encode("utf-8")).hexdigest()


def _job_work(
    data: object, settings: Settings, service: InferenceService, model_name: str
) -> tuple[str, int, EmbedJob | RerankJob | ClassifyJob]:
    """The job's type, item count and work, from a body validated as its endpoint would, and
    (with truncation off) every text checked against the model window."""
    body = validate(JobRequest, data)
    if body.type == "classify":
        return _classify_job(body.input, settings, service, model_name)
    if body.type in ("embed", "embed_sparse"):
        embed = validate(EmbedRequest, body.input)
        if embed.embedding_type != "float":
            raise InvalidInputError(
                f"input.embedding_type: jobs answer float vectors only (not {embed.embedding_type}); "
                "use POST /embed for codes"
            )
        texts = [chunk.content for chunk in embed.chunks]
        labels = [f"input.chunks.{i} (chunk_id {c.chunk_id!r})" for i, c in enumerate(embed.chunks)]
        _check_size(settings, texts)
        budget = service.max_tokens if embed.truncate else None
        texts = fit_texts(settings, texts, labels, budget, "truncate is false")
        sparse = body.type == "embed_sparse"
        if not service.strategy.serves(body.type):  # the job types embed, embed_sparse are capabilities
            hint = (
                ' (a sparse model: "type": "embed_sparse")' if service.strategy.serves("embed_sparse") else ""
            )
            raise UnsupportedOperationError(
                f"the model is a {service.kind.value}: it cannot run an {body.type} job{hint}"
            )
        # An inference-free sparse model's queries: its static table (no prompt); else the prompt.
        query = sparse and service.inference_free and service.is_query(embed.prompt_name, embed.input_type)
        prompt = "" if query else service.embed_prompt(embed.prompt_name, embed.input_type)  # unknown: 422
        if not embed.truncate:
            _refuse_too_long(service, [prompt + text for text in texts], labels, "truncate is false")
        ids = [chunk.chunk_id for chunk in embed.chunks]
        work = EmbedJob(
            embed.batch_id,
            ids,
            texts,
            embed.normalize,
            embed.truncate,
            model_name,
            prompt,
            sparse,
            embed.top_k,
            query,
        )
        return body.type, len(texts), work
    rerank = validate(CohereRerankRequest, body.input)
    texts = rerank.texts()
    labels = [f"input.documents.{i}" for i in range(len(texts))]
    _check_size(settings, [rerank.query, *texts])
    long = long_documents(rerank, settings)
    window = service.max_tokens
    budget = document_tokens(long, window)
    query, texts = fit_rerank(
        settings,
        rerank.query,
        texts,
        window,
        budget,
        'truncate is "NONE"',
        ("input.query", "input.documents"),
    )
    service.check_instruction(rerank.instruction)
    if long.mode == "refuse":
        scoring = service.scoring_query(query, rerank.instruction)
        _refuse_too_long(service, texts, labels, 'truncate is "NONE"', query=scoring)
    reranking = RerankJob(
        query,
        texts,
        rerank.documents,
        rerank.top_n,
        rerank.return_documents,
        long,
        rerank.instruction,
        rerank.raw_scores,
        rerank.return_details,
    )
    return "rerank", len(texts), reranking


def _classify_job(
    data: dict[str, Any], settings: Settings, service: InferenceService, model_name: str
) -> tuple[str, int, ClassifyJob]:
    """A classify job's input: ``{"inputs": [text | [text, text], ...], "raw_scores"?, "truncate"?}``,
    checked as /predict checks it; with truncation off, every input is tokenized now."""
    body = validate(ClassifyJobInput, data)
    texts = [t for item in body.inputs for t in ([item] if isinstance(item, str) else item)]
    _check_size(settings, texts)
    budget = service.max_tokens if body.truncate else None
    inputs = fit_inputs(settings, body.inputs, "input.inputs", budget, "truncate is false")
    if not body.truncate:
        position = service.first_too_long_input(inputs)
        if position is not None:
            raise InvalidInputError(
                f"input.inputs.{position}: longer than the model's {service.max_tokens}-token window "
                "and truncate is false"
            )
    shaped: list[str | list[str]] = [item if isinstance(item, str) else list(item) for item in inputs]
    return "classify", len(shaped), ClassifyJob(shaped, model_name, body.raw_scores, body.truncate)


def _refuse_too_long(
    service: InferenceService, texts: list[str], labels: list[str], because: str, query: str | None = None
) -> None:
    position = service.first_too_long(texts, query)
    if position is not None:
        raise InvalidInputError(
            f"{labels[position]}: longer than the model's {service.max_tokens}-token window and {because}"
        )


async def job_status(request: Request) -> Response:
    job = await find_job(request, request.path_params["job_id"])
    return await json_response(job.view())


async def cancel_job(request: Request) -> Response:
    """Cancel a queued or running job (it stops before its next slice); delete a finished one."""
    job = await cancel_job_for(request, request.path_params["job_id"])
    return await json_response(job.view())


def _check_size(settings: Settings, texts: list[str]) -> None:
    if len(texts) > settings.max_texts_per_job:
        raise PayloadTooLargeError(
            f"{len(texts)} texts is over MAX_TEXTS_PER_JOB={settings.max_texts_per_job}"
        )
