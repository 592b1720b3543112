"""MLX backend: the model run with mlx.core, on Apple Silicon (or CPU elsewhere), in float32,
float16 or bfloat16.

Half precision (``dtype``): the weights are stored in it and the transformer runs in it;
its hidden states are upcast to float32 before pooling, heads and a causal-LM reranker's
yes/no logit difference. ``half_agreement`` compares the probe texts' answers with a
float32 copy loaded for the purpose (agreement.py); the factory holds it to
HALF_PRECISION_MIN_AGREEMENT.

Families (``mlx_families.py`` decides, before anything loads): BERT, RoBERTa / XLM-RoBERTa /
CamemBERT, DistilBERT and ModernBERT run in our own encoder module (``mlx_encoders.py``);
Qwen2 / Qwen3 decoders run through mlx-lm's model implementations (``mlx_decoders.py``).
Cross-encoders give one logit per pair (their classification head, or logit(yes) -
logit(no) for a causal-LM reranker); bi-encoders run their sentence-transformers Pooling and
Dense modules (``mlx_modules.py``). There is no dropout anywhere: the model in eval mode.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from reranker.backends.agreement import PROBES, Agreement, compare
from reranker.backends.base import Encoded, ModelInfo
from reranker.backends.mlx_decoders import Decoder
from reranker.backends.mlx_encoders import PREFIXES, Encoder, build_encoder
from reranker.backends.mlx_families import DECODER_FAMILIES, INSTEAD, mlx_refusal
from reranker.backends.mlx_layers import Weights, load_weights
from reranker.backends.mlx_modules import load_dense, pool
from reranker.backends.source import ModelLayout, ModelSource, layout_facts, module_list, read_json
from reranker.backends.templates import CAUSAL_TEMPLATES
from reranker.backends.tokenization import TextTokenizer, TokenizedBackend
from reranker.errors import StartupError
from reranker.kinds import kind_of


def _max_length(layout: ModelLayout) -> int:
    """The declared length (sentence-transformers, else the tokenizer), at most what the
    position table holds (source.py: RoBERTa-style tables start after the padding id: 514 -> 512)."""
    limit = layout.position_limit
    declared = layout.declared_max_length or limit or 512
    return min(declared, limit) if limit else declared


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class MlxBackend(TokenizedBackend):
    runs_batches_concurrently = False  # one MLX evaluation at a time: its streams are not shared safely
    _evaluating = threading.Lock()  # and one across every MLX model of the process (multi-model)

    def __init__(self, source: ModelSource, dtype: str = "float32") -> None:
        refusal = mlx_refusal(source)
        if refusal:
            raise StartupError(f"{refusal}; {INSTEAD}")
        root = Path(source.path)
        self._source = source
        self._config = read_json(root / "config.json")
        self._dtype = DTYPES[dtype]
        self._family = str(self._config["model_type"])
        self._max_length = _max_length(source.layout)
        if source.max_length_cap:
            self._max_length = min(self._max_length, source.max_length_cap)
        self._encoder: Encoder | None = None
        self._decoder: Decoder | None = None
        if self._family in DECODER_FAMILIES:
            self._decoder = Decoder(root, self._config, self._dtype)
        else:
            self._encoder = build_encoder(self._config, Weights(load_weights(root, PREFIXES, self._dtype)))
        layout = source.layout
        self._kind = kind_of(source.kind)
        bi_encoder = not self._kind.one_score  # MLX runs bi-encoders and cross-encoders (mlx_families)
        self._pooling = (layout.pooling or ("mean",)) if bi_encoder else ()
        self._dense = [load_dense(layer) for layer in layout.dense] if bi_encoder else []
        self._normalizes = layout.normalizes and bi_encoder
        self._yes_no: list[int] | None = None
        pad_id = int(self._config.get("pad_token_id") or 0)
        self.tokenizer = TextTokenizer.from_file(
            root / "tokenizer.json",
            self._max_length,
            pad_id,
            token_types=layout.uses_token_types,
            padding_side="right",  # always: decoders read each item's last real token (mlx_decoders.py)
            template=CAUSAL_TEMPLATES[self._family] if layout.causal_lm else None,
        )
        if self._kind.one_score:
            self._check_head(root)
        self.half_agreement: Agreement | None = None
        if dtype != "float32":
            self.half_agreement = self._compare_with(MlxBackend(source))

    def _compare_with(self, reference: MlxBackend) -> Agreement:
        probes = self._kind.probe_inputs(self, PROBES)
        return compare(self._kind.name, self.forward(probes), reference.forward(probes))

    def _check_head(self, root: Path) -> None:
        if self._decoder is not None and self._source.layout.causal_lm:
            self._yes_no = _yes_no_ids(root)
            self._decoder.vocabulary_rows(self._yes_no)
            return
        labels = self._logits(self.tokenizer.collate(self.tokenizer.pairs([("a", "b")]))).shape[1]
        if labels != 1:
            raise StartupError(
                f"MLX backend: the {self._family} cross-encoder has {labels} labels; only single-label "
                "cross-encoders (rerankers) can be served"
            )

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self._source.name,
            kind=self._source.kind,
            backend="mlx",
            device=str(mx.default_device()).removeprefix("Device(").split(",")[0],
            max_length=self._max_length,
            dimension=None if self._kind.one_score else self._dimension(),
            normalize_embeddings=self._normalizes,
            dtype=str(self._dtype).removeprefix("mlx.core."),
            details=({"pooling": "+".join(self._pooling)} if self._pooling else {})
            | ({"half_precision_agreement": self.half_agreement.text} if self.half_agreement else {}),
            **layout_facts(self._source),
        )

    def _dimension(self) -> int:
        if self._dense:
            return self._dense[-1].out_features
        width = self._encoder.width if self._encoder is not None else self._decoder.width  # type: ignore[union-attr]
        return width * len(self._pooling)

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        inputs = self.tokenizer.collate(batch)
        with MlxBackend._evaluating:
            output = self._logits(inputs)
            if self._kind.one_score:
                output = output[:, 0]
            mx.eval(output)
            return np.array(output, dtype=np.float32)

    def _logits(self, arrays: dict[str, np.ndarray]) -> mx.array:
        """Cross-encoder logits [n, labels], or bi-encoder vectors [n, dim]."""
        ids = mx.array(arrays["input_ids"].astype(np.int32))
        mask = mx.array(arrays["attention_mask"].astype(np.float32)).astype(self._dtype)
        if self._decoder is not None:
            return self._forward_decoder(ids, mask, arrays["attention_mask"].sum(axis=1))
        return self._forward_encoder(ids, mx.array(arrays["token_type_ids"].astype(np.int32)), mask)

    def _forward_encoder(self, ids: mx.array, types: mx.array, mask: mx.array) -> mx.array:
        assert self._encoder is not None
        hidden = self._encoder.hidden_states(ids, types, mask).astype(mx.float32)  # heads run on float32
        mask = mask.astype(mx.float32)
        if self._kind.one_score:
            return self._encoder.score(hidden, mask)
        return self._head(pool(hidden, mask, self._pooling))

    def _forward_decoder(self, ids: mx.array, mask: mx.array, lengths: np.ndarray) -> mx.array:
        assert self._decoder is not None
        if not self._kind.one_score:
            if self._pooling == ("lasttoken",):
                return self._head(self._decoder.last_states(ids, lengths).astype(mx.float32))
            hidden = self._decoder.backbone(ids).astype(mx.float32)
            return self._head(pool(hidden, mask.astype(mx.float32), self._pooling))
        if self._yes_no is not None:
            rows = self._decoder.vocabulary_rows(self._yes_no).astype(mx.float32)
            logits = self._decoder.last_states(ids, lengths).astype(mx.float32) @ rows.T  # upcast first
            return logits[:, :1] - logits[:, 1:]  # its sigmoid is softmax([no, yes])[yes]
        last = self._decoder.last_states(ids, lengths, skip_padding_ids=True).astype(mx.float32)
        return last @ self._decoder.score_head().astype(mx.float32).T

    def _head(self, vectors: mx.array) -> mx.array:
        for layer in self._dense:
            vectors = layer(vectors)
        return vectors


def _yes_no_ids(root: Path) -> list[int]:
    """[yes, no] token ids: a LogitScore module's if the model has one, else the tokens "yes" and "no"."""
    for module in module_list(root):
        if str(module.get("type", "")).endswith("LogitScore"):
            config = read_json(root / str(module.get("path", "")) / "config.json")
            if config.get("false_token_id") is None:
                raise StartupError("MLX backend: a LogitScore without a false token is not implemented")
            return [int(config["true_token_id"]), int(config["false_token_id"])]
    vocabulary = Tokenizer.from_file(str(root / "tokenizer.json"))
    ids = [vocabulary.token_to_id("yes"), vocabulary.token_to_id("no")]
    if None in ids:
        raise StartupError("MLX backend: the causal-LM reranker's tokenizer has no 'yes' / 'no' tokens")
    return [int(i) for i in ids]  # type: ignore[arg-type]
