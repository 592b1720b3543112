"""What an embed or rerank job does: the request's work, slice by slice, at background priority.

Each slice is one full batch, and two slices are in the controller at a time: while one
runs, the next is tokenized and queued, so the model never waits between slices. The
controller batches a job's items only while no interactive request waits, so a small
request waits at most for the job batch already running. Progress advances as slices
complete; a cancel drops the queued slice before it reaches the model, and the job stops
once the running one completes. The texts go through shortest first, so each slice holds
texts of about one length and pads little (what the controller's length grouping does for
one big request); the output is put back in the order sent.

A job's work is rebuilt from its ``spec`` (``{"type", "input"}``: the validated fields as
JSON) by whichever worker takes it, in this process or another instance of the cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from reranker.engine.jobs import Job, JobCancelledError
from reranker.engine.rerank_results import cohere_v1_body
from reranker.engine.service import (
    ClassifyOutcome,
    EmbedOutcome,
    InferenceService,
    LongDocuments,
    RerankOutcome,
    TextTooLongError,
)
from reranker.errors import InvalidInputError, RerankerError
from reranker.kinds.sparse import sparse_entries

T = TypeVar("T")
SLICES_IN_FLIGHT = 2


async def in_slices(
    job: Job, count: int, service: InferenceService, work: Callable[[int, int], Awaitable[T]]
) -> list[T]:
    """``work(start, stop)`` over ``range(count)`` in slices of one batch, in order, two at a time."""
    step = max(1, service.batch_limit)
    outstanding: deque[tuple[int, asyncio.Task[T]]] = deque()
    results: list[T] = []
    try:
        for start in range(0, count, step):
            job.check_cancelled()
            stop = min(count, start + step)
            outstanding.append((stop - start, asyncio.ensure_future(work(start, stop))))
            if len(outstanding) >= SLICES_IN_FLIGHT:
                results.append(await _completed(job, *outstanding.popleft()))
        while outstanding:
            results.append(await _completed(job, *outstanding.popleft()))
    finally:
        for _, task in outstanding:
            task.cancel()
        await asyncio.gather(*(task for _, task in outstanding), return_exceptions=True)
    return results


async def _completed(job: Job, size: int, task: asyncio.Task[T]) -> T:
    try:
        result = await task
    except asyncio.CancelledError:
        if job.cancel_requested and not _current_task_cancelling():
            raise JobCancelledError from None  # its slice was dropped for the cancel
        raise
    job.advance(size)
    if job.sync is not None:
        await job.sync()
    job.check_cancelled()
    return result


def length_order(texts: Sequence[str]) -> np.ndarray:
    """The positions of ``texts``, shortest first (characters: a cheap proxy for tokens)."""
    lengths = np.fromiter((len(text) for text in texts), dtype=np.int64, count=len(texts))
    return np.argsort(lengths, kind="stable")


def unsorted(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``rows`` computed in ``order``, put back in the original order."""
    restored = np.empty_like(rows)
    restored[order] = rows
    return restored


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(frozen=True)
class EmbedJob:
    batch_id: str
    chunk_ids: list[str]
    texts: list[str]
    normalize: bool | None
    truncate: bool
    model: str
    prompt: str = ""  # the prompt the submission chose (resolved then: prompt_name, input_type, default)
    sparse: bool = False  # spec version 3: a sparse model's weights, as indices and values
    top_k: int | None = None  # spec version 3: sparse: the largest weights kept per chunk
    as_query: bool = False  # spec version 3: an inference-free sparse model's queries (its static table)

    async def __call__(self, job: Job, service: InferenceService) -> dict[str, Any]:
        order = length_order(self.texts)
        texts_in_order = [self.texts[i] for i in order]

        async def piece(start: int, stop: int) -> EmbedOutcome:
            try:
                texts = texts_in_order[start:stop]
                outcome = await service.embed(
                    texts,
                    self.normalize,
                    self.truncate,
                    background=True,
                    prompt=self.prompt,
                    query=self.as_query,
                )
            except TextTooLongError as exc:
                position = int(order[start + exc.position])
                raise InvalidInputError(
                    f"chunks.{position} (chunk_id {self.chunk_ids[position]!r}): longer than the model's "
                    f"{exc.max_tokens} tokens and truncate is false"
                ) from None
            if self.sparse:  # a slice's vocabulary-sized rows kept as their non-zero entries only
                entries = np.empty(len(texts), dtype=object)
                entries[:] = [sparse_entries(vector, self.top_k) for vector in outcome.vectors]
                return dataclasses.replace(outcome, vectors=entries)
            return outcome

        outcomes = await in_slices(job, len(self.texts), service, piece)
        vectors = unsorted(np.concatenate([outcome.vectors for outcome in outcomes]), order)
        tokens = sum(outcome.tokens for outcome in outcomes)
        truncated = sum(outcome.truncated for outcome in outcomes)
        if self.sparse:
            rows = [
                {"chunk_id": c, "indices": indices, "values": values}
                for c, (indices, values) in zip(self.chunk_ids, vectors, strict=True)
            ]
            dimension = service.dimension
        else:
            rows = [{"chunk_id": c, "vector": v} for c, v in zip(self.chunk_ids, vectors, strict=True)]
            dimension = int(vectors.shape[1])
        return {
            "batch_id": self.batch_id,
            "model": self.model,
            "dimension": dimension,
            "vectors": rows,
            "usage": {"chunks": len(self.texts), "total_tokens": tokens, "truncated_chunks": truncated},
        }

    def spec(self) -> dict[str, Any]:
        return versioned_spec("embed", asdict(self))


@dataclass(frozen=True)
class RerankJob:
    query: str
    texts: list[str]
    documents: Sequence[Any]  # as sent, for return_documents
    top_n: int | None
    return_documents: bool
    long: LongDocuments
    instruction: str | None = None  # instruction-style rerankers: None is the model's default
    raw_scores: bool = False  # the logit instead of the model's activation of it
    return_details: bool = False  # spec version 2

    async def __call__(self, job: Job, service: InferenceService) -> dict[str, Any]:
        query_vector, query_tokens = None, 0
        if service.strategy.rerank_by == "vectors":  # the query embedded once, not once per slice
            query_vector, query_tokens = await service.query_vector_of(self.query, background=True)

        order = length_order(self.texts)
        texts_in_order = [self.texts[i] for i in order]

        async def piece(start: int, stop: int) -> RerankOutcome:
            try:
                texts = texts_in_order[start:stop]
                return await service.rerank(
                    self.query, texts, self.long, True, query_vector, instruction=self.instruction
                )
            except TextTooLongError as exc:
                raise InvalidInputError(
                    f"documents.{int(order[start + exc.position])}: longer than the model's window "
                    'and truncate is "NONE"'
                ) from None

        outcomes = await in_slices(job, len(self.texts), service, piece)
        return cohere_v1_body(
            joined(outcomes, order, query_tokens),
            self.documents,
            top_n=self.top_n,
            return_documents=self.return_documents,
            return_details=self.return_details,
            raw_scores=self.raw_scores,
            long=self.long,
            window=service.max_tokens,
        )

    def spec(self) -> dict[str, Any]:
        return versioned_spec("rerank", asdict(self))


@dataclass(frozen=True)
class ClassifyJob:
    """A classifier's labels of many texts or pairs (spec version 3)."""

    inputs: list[str | list[str]]  # a text, or a pair as a two-string list (JSON has no tuples)
    model: str
    raw_scores: bool = False
    truncate: bool = True

    async def __call__(self, job: Job, service: InferenceService) -> dict[str, Any]:
        items = [item if isinstance(item, str) else (item[0], item[1]) for item in self.inputs]

        async def piece(start: int, stop: int) -> ClassifyOutcome:
            try:
                return await service.classify(items[start:stop], self.truncate, background=True)
            except TextTooLongError as exc:
                raise InvalidInputError(
                    f"inputs.{start + exc.position}: longer than the model's {exc.max_tokens} tokens "
                    "and truncate is false"
                ) from None

        outcomes = await in_slices(job, len(items), service, piece)
        values = np.concatenate([o.logits if self.raw_scores else o.scores for o in outcomes])
        labels = service.labels
        predictions = [
            [{"score": float(row[i]), "label": labels[i]} for i in np.argsort(-row, kind="stable")]
            for row in values
        ]
        tokens = sum(outcome.tokens for outcome in outcomes)
        return {
            "model": self.model,
            "predictions": predictions,
            "usage": {"inputs": len(items), "total_tokens": tokens},
        }

    def spec(self) -> dict[str, Any]:
        return versioned_spec("classify", asdict(self))


def joined(outcomes: list[RerankOutcome], order: np.ndarray, query_tokens: int = 0) -> RerankOutcome:
    """One outcome for the whole request from its slices' (run in ``order``), in the order sent;
    ``query_tokens``: a bi-encoder's query, embedded once before the slices."""
    offsets = np.cumsum([0] + [len(outcome.scores) for outcome in outcomes])
    cut = [
        int(order[offset + i])
        for offset, o in zip(offsets[:-1], outcomes, strict=True)
        for i in o.truncated_documents
    ]
    windows = unsorted(np.array([w for outcome in outcomes for w in outcome.windows]), order)
    return RerankOutcome(
        scores=unsorted(np.concatenate([outcome.scores for outcome in outcomes]), order),
        ranking=unsorted(np.concatenate([outcome.ranking for outcome in outcomes]), order),
        tokens=query_tokens + sum(outcome.tokens for outcome in outcomes),
        timing=outcomes[0].timing,
        windows=[int(w) for w in windows],
        truncated_documents=sorted(cut),
    )


# A spec's version is the lowest format that describes it, so an ordinary job stays runnable by an
# older worker during a rolling restart. 1: the first format (no "version" key); 2: rerank jobs'
# ``return_details``; 3: sparse embed jobs (``sparse``, ``top_k``, ``as_query``) and classify jobs. A field
# added later is written only when it differs from its default.
SPEC_VERSION = 3
ADDED_IN = {  # per job type: field -> the spec version that added it
    "embed": {"sparse": 3, "top_k": 3, "as_query": 3},
    "rerank": {"return_details": 2},
}
TYPE_ADDED_IN = {"classify": 3}  # a job type an older worker does not know

# A job type (as submitted) -> the capability its model must have (ModelInfo.capabilities).
JOB_CAPABILITY = {
    "embed": "embed",
    "embed_sparse": "embed_sparse",
    "rerank": "rerank",
    "classify": "classify",
}


def spec_capability(spec: dict[str, Any]) -> str:
    """What a stored spec's model must serve (a sparse embed job is stored as type embed)."""
    if spec.get("type") == "embed" and (spec.get("input") or {}).get("sparse"):
        return "embed_sparse"
    return JOB_CAPABILITY.get(str(spec.get("type")), "rerank")


class JobSpecError(RerankerError):
    """A job spec this worker cannot run (written by a newer version, or damaged)."""

    error_type = "job_spec_unsupported"


def versioned_spec(job_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    version = TYPE_ADDED_IN.get(job_type, 1)
    for name, since in ADDED_IN.get(job_type, {}).items():
        if name in fields and fields[name] == _DEFAULTS[job_type].get(name):
            del fields[name]  # at its default: an older worker runs the job the same way
        elif name in fields:
            version = max(version, since)
    spec: dict[str, Any] = {"type": job_type, "input": fields}
    if version > 1:
        spec["version"] = version
    return spec


def work_from_spec(spec: dict[str, Any]) -> EmbedJob | RerankJob | ClassifyJob:
    """The work a job's ``spec`` describes (what ``EmbedJob.spec``/``RerankJob.spec`` wrote, in this
    version's format or an older one); JobSpecError, which fails the job, for one it cannot run."""
    version = spec.get("version", 1)
    if not isinstance(version, int) or version > SPEC_VERSION:
        raise JobSpecError(
            f"the job was submitted by a newer reranker (job spec version {version}; this instance "
            f"runs versions up to {SPEC_VERSION}): finish the upgrade, then submit it again"
        )
    kinds: dict[str, type[EmbedJob] | type[RerankJob] | type[ClassifyJob]] = {
        "embed": EmbedJob,
        "rerank": RerankJob,
        "classify": ClassifyJob,
    }
    kind = kinds.get(str(spec.get("type")))
    fields = dict(spec.get("input") or {})
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(kind)}) if kind else []
    if kind is None or unknown:
        raise JobSpecError(
            f"the job's spec cannot be run by this instance (type {spec.get('type')!r}, "
            f"unknown fields {unknown}, spec version {version})"
        )
    if kind is RerankJob:
        long = fields.get("long")
        known = {f.name for f in dataclasses.fields(LongDocuments)}
        if not isinstance(long, dict) or set(long) - known:
            raise JobSpecError(f"the job's spec cannot be run by this instance (long: {long!r})")
        fields["long"] = LongDocuments(**long)
    return kind(**fields)


_DEFAULTS = {
    name: {f.name: f.default for f in dataclasses.fields(kind) if f.default is not dataclasses.MISSING}
    for name, kind in (("embed", EmbedJob), ("rerank", RerankJob), ("classify", ClassifyJob))
}
