"""The model's declared prompts, applied as sentence-transformers applies them.

A bi-encoder's ``config_sentence_transformers.json`` may name prompts (e5's ``query: `` and
``passage: ``, Qwen3-Embedding's instruction): ``encode(prompt_name=...)`` prepends the named
text; ``encode_query`` uses the "query" prompt and ``encode_document`` the first of "document",
"passage", "corpus" the model has; plain ``encode`` uses the model's ``default_prompt_name``
(or none). Rerank on a bi-encoder compares ``encode_query`` with ``encode_document``.
"""

from __future__ import annotations

from reranker.backends.base import ModelInfo
from reranker.errors import InvalidInputError

DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
# Cohere's input_type values (and the plain names) -> the role whose prompt they select.
INPUT_TYPES = {
    "query": "query",
    "search_query": "query",
    "document": "document",
    "search_document": "document",
}


class UnknownPromptError(InvalidInputError):
    """A prompt name the model does not declare (422, listing the ones it does)."""


def query_prompt(info: ModelInfo) -> str:
    return info.prompts.get("query", "")


def document_prompt(info: ModelInfo) -> str:
    return next((info.prompts[name] for name in DOCUMENT_PROMPT_NAMES if name in info.prompts), "")


def named_prompt(info: ModelInfo, name: str, what: str = "prompt_name") -> str:
    if name not in info.prompts:
        declared = ", ".join(repr(n) for n in sorted(info.prompts)) or "none"
        raise UnknownPromptError(
            f"{what}: the model {info.name} has no prompt {name!r} (its prompts: {declared})"
        )
    return info.prompts[name]


def embed_prompt(
    info: ModelInfo, prompt_name: str | None, input_type: str | None, default_name: str | None
) -> str:
    """The text prepended to /embed and /v1/embeddings inputs: ``prompt_name`` if given, else the
    role ``input_type`` names (Cohere's search_query/search_document included: the model's query
    or document prompt, none if it has none), else ``default_name`` (DEFAULT_PROMPT_NAME, else
    the model's default_prompt_name), else none."""
    if prompt_name is not None:
        return named_prompt(info, prompt_name)
    if input_type is not None:
        role = INPUT_TYPES.get(input_type)
        if role is None:
            return named_prompt(info, input_type, "input_type")
        return query_prompt(info) if role == "query" else document_prompt(info)
    name = default_name or info.default_prompt_name
    return named_prompt(info, name, "DEFAULT_PROMPT_NAME") if name else ""
