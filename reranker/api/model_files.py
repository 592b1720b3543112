"""What the TEI dialect reads from the served model's own files: its prompts
(``config_sentence_transformers.json``, for ``prompt_name``) and its tokenizer (``/tokenize``).

Read once, on first use, in a worker thread (file I/O), and kept on the app's state.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from starlette.requests import Request
from tokenizers import Tokenizer

from reranker.backends.source import resolve_model_source
from reranker.errors import InvalidInputError
from reranker.settings import Settings


@dataclass(frozen=True)
class ModelFiles:
    prompts: dict[str, str]
    tokenizer: Tokenizer | None

    def prompt(self, name: str) -> str:
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidInputError(f"prompt_name: {name!r} is not one of the model's prompts ({known})")
        return self.prompts[name]


def read_model_files(settings: Settings) -> ModelFiles:
    root = resolve_model_source(settings).path
    config = root / "config_sentence_transformers.json"
    prompts = json.loads(config.read_text(encoding="utf-8")).get("prompts", {}) if config.is_file() else {}
    tokenizer_json = root / "tokenizer.json"
    tokenizer = None
    if tokenizer_json.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        tokenizer.no_truncation()  # /tokenize shows every token, as TEI does
        tokenizer.no_padding()
    return ModelFiles({str(k): str(v) for k, v in prompts.items()}, tokenizer)


async def model_files(request: Request) -> ModelFiles:
    state = request.app.state
    if getattr(state, "model_files", None) is None:
        state.model_files = await asyncio.to_thread(read_model_files, state.runtime.settings)
    return state.model_files
