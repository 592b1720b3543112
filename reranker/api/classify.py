"""Classifiers: TEI's ``POST /predict`` (and ``POST /`` on a classifier) and Infinity's
``POST /infinity/classify``. Every label of the model (``id2label``), best first; softmax over
the labels, or a sigmoid per label for one-label and multi-label models; raw logits on request."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import Response

from reranker.api.body import read_body, read_json, unless_disconnected, validate
from reranker.api.dialects import TEI, speak
from reranker.api.observe import model_of, runtime_of, timing_headers
from reranker.api.responses import ORJSONResponse
from reranker.api.schemas import _Body, check_embed_limits
from reranker.api.tei import long_refused
from reranker.api.text_limits import fit_inputs
from reranker.engine.service import ClassifyOutcome
from reranker.errors import InvalidInputError

Input = str | tuple[str, str]


class PredictRequest(_Body):
    """TEI's /predict: a text, ONE pair ``[a, b]``, or a batch of 1- or 2-string lists."""

    inputs: str | list[str] | list[list[str]]
    raw_scores: bool = Field(False, description="The logits instead of softmax / sigmoid scores.")
    truncate: bool = Field(True, description="false: an input over the model window is a 422.")

    def batch(self) -> tuple[list[Input], bool]:
        """The inputs, and whether the answer is one list per input (a batch) or a flat list."""
        inputs, batched = self._shaped()
        for position, item in enumerate(inputs):
            if not all(text.strip() for text in ([item] if isinstance(item, str) else item)):
                raise InvalidInputError(
                    f"inputs.{position}: a text is empty" if batched else "inputs: a text is empty"
                )
        return inputs, batched

    def _shaped(self) -> tuple[list[Input], bool]:
        value = self.inputs
        if isinstance(value, str):
            return [value], False
        if value and all(isinstance(item, str) for item in value):
            if len(value) != 2:
                raise InvalidInputError(
                    f"inputs: {len(value)} strings: a flat list is one pair [text, text]; send a batch as "
                    '[["text"], ["text", "text"], ...]'
                )
            return [(str(value[0]), str(value[1]))], False
        inputs: list[Input] = []
        for position, item in enumerate(value):
            if not isinstance(item, list) or len(item) not in (1, 2):
                raise InvalidInputError(f"inputs.{position}: a batch item is [text] or [text, text]")
            inputs.append(item[0] if len(item) == 1 else (item[0], item[1]))
        if not inputs:
            raise InvalidInputError("inputs: must not be empty")
        return inputs, True


class InfinityClassifyRequest(_Body):
    input: list[str] = Field(min_length=1)
    model: str | None = None
    raw_scores: bool = False

    @field_validator("input")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        for index, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"input {index} is empty")
        return value


def ranked_labels(scores: np.ndarray, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")
    return [{"score": float(scores[i]), "label": labels[i]} for i in order]


async def _classify(
    request: Request, requested: str | None, inputs: list[Input], truncate: bool
) -> tuple[ClassifyOutcome, tuple[str, ...], str]:
    settings = runtime_of(request).settings
    check_embed_limits(settings, [t for item in inputs for t in ([item] if isinstance(item, str) else item)])
    model = model_of(request, requested, "classify")
    service = model.require_service()
    inputs = fit_inputs(
        settings, inputs, "inputs", service.max_tokens if truncate else None, "truncate is false"
    )
    outcome = await long_refused(
        unless_disconnected(request, service.classify(inputs, allow_truncation=truncate)),
        "inputs",
        service.max_tokens,
    )
    assert model.info is not None
    return outcome, model.info.labels, model.name


async def predict(request: Request, data: Any, started: float) -> Response:
    speak(request, TEI)
    body = validate(PredictRequest, data)
    inputs, batched = body.batch()
    outcome, labels, _ = await _classify(request, None, inputs, body.truncate)
    values = outcome.logits if body.raw_scores else outcome.scores
    answers = [ranked_labels(row, labels) for row in values]
    headers = timing_headers(request, outcome.timing, started, len(inputs))
    return ORJSONResponse(answers if batched else answers[0], headers=headers)


async def predict_route(request: Request) -> Response:
    """TEI's ``POST /predict``."""
    started = time.perf_counter()
    settings = runtime_of(request).settings
    return await predict(
        request, await read_json(request, settings.max_request_bytes, settings.body_read_timeout_s), started
    )


async def infinity_classify(request: Request) -> Response:
    """Infinity's ``POST /classify`` (under /infinity): every label per input, best first."""
    started = time.perf_counter()
    body = await read_body(request, InfinityClassifyRequest, runtime_of(request).settings)
    inputs: list[Input] = list(body.input)
    outcome, labels, name = await _classify(request, body.model, inputs, True)
    values = outcome.logits if body.raw_scores else outcome.scores
    content = {
        "object": "classify",
        "data": [ranked_labels(row, labels) for row in values],
        "model": name,
        "usage": {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens},
        "id": f"infinity-{uuid.uuid4()}",
        "created": int(time.time()),
    }
    return ORJSONResponse(content, headers=timing_headers(request, outcome.timing, started, len(inputs)))
