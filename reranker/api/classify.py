"""Classifiers: TEI's ``POST /predict`` (and ``POST /`` on a classifier) and Infinity's
``POST /infinity/classify``. Every label of the model (``id2label``), best first; softmax over
the labels, or a sigmoid per label for one-label and multi-label models; raw logits on request."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from reranker.api.calls import ClassifyCall, Input
from reranker.api.dialects import TEI
from reranker.api.pipeline import Dialect, Rendering, handler
from reranker.api.schemas import _Body
from reranker.api.tei import REFUSED
from reranker.engine.service import ClassifyOutcome
from reranker.errors import InvalidInputError
from reranker.settings import Settings


class PredictRequest(_Body):
    """TEI's /predict: a text, ONE pair ``[a, b]``, or a batch of 1- or 2-string lists."""

    inputs: str | list[str] | list[list[str]]
    raw_scores: bool = Field(False, description="The logits instead of softmax / sigmoid scores.")
    truncate: bool = Field(True, description="false: an input over the model window is a 422.")

    @property
    def batched(self) -> bool:
        """Whether the answer is one list per input (a batch) or the one input's list."""
        return isinstance(self.inputs, list) and not all(isinstance(item, str) for item in self.inputs)

    def batch(self) -> list[Input]:
        """The inputs: texts and (text, text) pairs."""
        inputs = self._shaped()
        for position, item in enumerate(inputs):
            if not all(text.strip() for text in ([item] if isinstance(item, str) else item)):
                raise InvalidInputError(
                    f"inputs.{position}: a text is empty" if self.batched else "inputs: a text is empty"
                )
        return inputs

    def _shaped(self) -> list[Input]:
        value = self.inputs
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(item, str) for item in value):
            if len(value) != 2:
                raise InvalidInputError(
                    f"inputs: {len(value)} strings: a flat list is one pair [text, text]; send a batch as "
                    '[["text"], ["text", "text"], ...]'
                )
            return [(str(value[0]), str(value[1]))]
        inputs: list[Input] = []
        for position, item in enumerate(value):
            if not isinstance(item, list) or len(item) not in (1, 2):
                raise InvalidInputError(f"inputs.{position}: a batch item is [text] or [text, text]")
            inputs.append(item[0] if len(item) == 1 else (item[0], item[1]))
        if not inputs:
            raise InvalidInputError("inputs: must not be empty")
        return inputs


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


def parse_predict(body: PredictRequest, settings: Settings) -> ClassifyCall:
    return ClassifyCall(
        inputs=body.batch(),
        truncate=body.truncate,
        raw_scores=body.raw_scores,
        field="inputs",
        because=REFUSED,
    )


def render_predict(r: Rendering[PredictRequest, ClassifyCall, ClassifyOutcome]) -> Any:
    """A list of labels per input for a batch, else the one input's list."""
    answers = _labelled(r)
    return answers if r.body.batched else answers[0]


def parse_infinity(body: InfinityClassifyRequest, settings: Settings) -> ClassifyCall:
    return ClassifyCall(
        inputs=list(body.input), truncate=True, raw_scores=body.raw_scores, field="input", because=""
    )


def render_infinity(r: Rendering[InfinityClassifyRequest, ClassifyCall, ClassifyOutcome]) -> dict[str, Any]:
    """Every label per input, best first."""
    tokens = r.result.tokens
    return {
        "object": "classify",
        "data": _labelled(r),
        "model": r.model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "id": f"infinity-{uuid.uuid4()}",
        "created": int(time.time()),
    }


def _labelled(r: Rendering[Any, ClassifyCall, ClassifyOutcome]) -> list[list[dict[str, Any]]]:
    assert r.model.info is not None
    values = r.result.logits if r.call.raw_scores else r.result.scores
    return [ranked_labels(row, r.model.info.labels) for row in values]


PREDICT = Dialect(PredictRequest, "classify", parse_predict, render_predict, speaks=TEI)
INFINITY = Dialect(InfinityClassifyRequest, "classify", parse_infinity, render_infinity)
predict_route = handler(PREDICT)  # TEI's POST /predict (and POST / on a classifier: tei.py)
infinity_classify = handler(INFINITY)  # Infinity's POST /classify (under /infinity)
