"""Prompt templates of causal-LM rerankers: how a (query, document) pair becomes the text whose
next-token logits score it.

Qwen3-Reranker (its model card): the score is P("yes") from a softmax over the "no" and "yes"
logits at the last position of

    <prefix><Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}<suffix>

left-padded. sentence-transformers' ``LogitScore`` gives logit(yes) - logit(no), whose sigmoid
is that same probability. A long document is cut into windows between the query part and the
suffix, so every window still ends in the suffix the model reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CausalRerankTemplate:
    prefix: str
    suffix: str
    default_instruction: str

    def query_part(self, query: str, instruction: str | None = None) -> str:
        """What comes between the prefix and the document: instruction and query."""
        return f"<Instruct>: {instruction or self.default_instruction}\n<Query>: {query}\n<Document>:"

    @staticmethod
    def document_part(document: str) -> str:
        return f" {document}"


QWEN3_RERANKER = CausalRerankTemplate(
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
        'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n"
    ),
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
)

# By model family. Only Qwen3-Reranker's template is known to be right: other causal-LM rerankers
# (mxbai-rerank-v2 on Qwen2 has a prompt of its own) are refused at start-up, never mis-templated.
CAUSAL_TEMPLATES = {"qwen3": QWEN3_RERANKER}
