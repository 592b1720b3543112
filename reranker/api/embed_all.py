"""TEI's ``POST /embed_all``: per input, one vector per token the model saw (special and prompt
tokens included, padding left out), before pooling or normalisation: the building block of
late-interaction retrieval. ``[n_inputs][n_tokens_i][hidden]``. A ``TokenVectorsCall`` (pipeline.py)."""

from __future__ import annotations

from typing import Any

from reranker.api.calls import Prompt, TokenVectors, TokenVectorsCall, labelled
from reranker.api.dialects import TEI
from reranker.api.pipeline import Dialect, Rendering, handler
from reranker.api.sparse import TeiSparseRequest
from reranker.api.tei import REFUSED
from reranker.settings import Settings


def parse(body: TeiSparseRequest, settings: Settings) -> TokenVectorsCall:
    texts = body.texts()
    return TokenVectorsCall(
        texts=texts,
        prompt=Prompt(body.prompt_name, None, ()),
        truncate=body.truncate,
        cut_from=body.cut_from,
        labels=labelled("inputs", len(texts)),
        because=REFUSED,
    )


def render(r: Rendering[TeiSparseRequest, TokenVectorsCall, TokenVectors]) -> list[list[Any]]:
    return [list(states) for states in r.result.vectors]


TOKEN_VECTORS = Dialect(TeiSparseRequest, "embed_tokens", parse, render, speaks=TEI)
embed_all = handler(TOKEN_VECTORS)
