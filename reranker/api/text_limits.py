"""MAX_TEXT_CHARS: the most characters of one text the tokenizer is given.

Tokenizing costs time in proportion to a text's characters, whether or not the model sees
them, and a request that truncates never needs more than its token budget's worth. So a text
over MAX_TEXT_CHARS is

- refused with a 422 naming it when the request turned truncation off (``truncate: false``,
  ``"truncate": "NONE"``, ``/tokenize``): all of it would have to be scored or shown;
- otherwise cut before tokenizing, at MAX_TEXT_CHARS or, when that is more, at
  ``CHARS_PER_TOKEN`` characters per token of the request's budget (the model window; the
  windows of a chunked rerank): what is cut lies beyond anything the model would have read,
  and the text is reported truncated as any text over the window is.
"""

from __future__ import annotations

from collections.abc import Sequence

from reranker.engine.service import LongDocuments
from reranker.errors import InvalidInputError
from reranker.settings import Settings

# Far above any tokenizer's characters per token on text (English averages about 4): a text cut
# here still holds more tokens than its budget, so the cut changes no token the model sees.
CHARS_PER_TOKEN = 32


def fit_texts(
    settings: Settings,
    texts: Sequence[str],
    labels: Sequence[str],
    tokens: int | None,
    because: str,
    keep_end: bool = False,
) -> list[str]:
    """``texts`` as the tokenizer may be given them. ``tokens``: the most tokens of each the
    request may use; None: truncation is off (``because`` says how), and a text over
    MAX_TEXT_CHARS is a 422 naming it (``labels``). ``keep_end``: a text is cut from its
    beginning instead (truncation from the start)."""
    limit = settings.max_text_chars
    cut_at = limit if tokens is None else max(limit, tokens * CHARS_PER_TOKEN)
    fitted = []
    for label, text in zip(labels, texts, strict=True):
        if len(text) > limit:
            if tokens is None:
                raise InvalidInputError(
                    f"{label}: {len(text)} characters is over MAX_TEXT_CHARS={limit} and {because} "
                    "(a request that truncates has a longer text cut instead)"
                )
            text = text[-cut_at:] if keep_end else text[:cut_at]
        fitted.append(text)
    return fitted


def fit_rerank(
    settings: Settings,
    query: str,
    documents: Sequence[str],
    window: int,
    document_tokens: int | None,
    because: str,
    labels: tuple[str, str] = ("query", "documents"),
) -> tuple[str, list[str]]:
    """The query (budget: the model ``window``) and the documents (``document_tokens``; None:
    truncation off, and then for the query too) as the tokenizer may be given them; ``labels``
    name the two fields in messages."""
    query_tokens = window if document_tokens is not None else None
    [fitted_query] = fit_texts(settings, [query], [labels[0]], query_tokens, because)
    names = [f"{labels[1]}.{i}" for i in range(len(documents))]
    return fitted_query, fit_texts(settings, documents, names, document_tokens, because)


def document_tokens(long: LongDocuments, window: int) -> int | None:
    """The most tokens of a document a rerank may score: its windows when it chunks, the model
    ``window`` when it truncates, None when it refuses a longer document."""
    if long.mode == "refuse":
        return None
    return long.max_windows * window if long.mode == "chunk" else window


def fit_inputs(
    settings: Settings, inputs: Sequence[str | Sequence[str]], prefix: str, tokens: int | None, because: str
) -> list[str | tuple[str, str]]:
    """A classifier's inputs (texts, and pairs as two texts) through ``fit_texts``: each part is
    labelled ``{prefix}.i`` (a pair's: ``{prefix}.i.0`` and ``.1``)."""
    parts: list[str] = []
    labels: list[str] = []
    for position, item in enumerate(inputs):
        if isinstance(item, str):
            parts.append(item)
            labels.append(f"{prefix}.{position}")
        else:
            parts.extend(item)
            labels.extend(f"{prefix}.{position}.{side}" for side in range(len(item)))
    fitted = iter(fit_texts(settings, parts, labels, tokens, because))
    return [next(fitted) if isinstance(item, str) else (next(fitted), next(fitted)) for item in inputs]


def check_dimensions(field: str, asked: int | None, model_dimension: int | None) -> None:
    """A Matryoshka cut (``dimensions``, ``output_dimension``) no larger than the model's vectors."""
    if asked and model_dimension and asked > model_dimension:
        raise InvalidInputError(f"{field}: {asked} is larger than the model's {model_dimension} dimensions")
