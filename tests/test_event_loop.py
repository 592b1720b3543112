"""The event loop only does I/O: a big response is rendered off it, so small requests go on."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import orjson

from reranker.api.app import create_app
from reranker.api.responses import ORJSON_OPTIONS, render_in_pieces
from reranker.backends.base import ModelKind, TokenSpan
from reranker.backends.fake import FakeBackend
from tests.conftest import make_settings
from tests.server import ServerThread

BIG = 10_000


def test_pieces_render_the_same_bytes_as_one_call() -> None:
    rng = np.random.default_rng(0)
    content = {
        "batch_id": "b",
        "vectors": [{"chunk_id": f"c{i}", "vector": rng.random(8, dtype=np.float32)} for i in range(3000)],
        "usage": {"chunks": 3000, "nested": {"data": list(range(5000))}},
        "empty": [],
    }
    assert render_in_pieces(content) == orjson.dumps(content, option=ORJSON_OPTIONS)


def test_a_small_request_is_answered_while_a_10000_vector_response_renders() -> None:
    backend = FakeBackend(ModelKind.BI_ENCODER, dimension=2048)  # ~170 MB of JSON to render
    app = create_app(make_settings(batch_size=256, max_request_bytes=50 * 1024 * 1024), backend=backend)
    big = {"batch_id": "big", "chunks": [{"chunk_id": str(i), "content": f"text {i}"} for i in range(BIG)]}
    small = {"batch_id": "small", "chunks": [{"chunk_id": "s", "content": "tiny"}]}
    finished: dict[str, float] = {}

    def post_big(client: httpx.Client) -> int:
        with client.stream("POST", "/embed", json=big) as response:
            finished["big headers"] = time.monotonic()  # sent only once the body is rendered
            body = response.read()
        assert len(orjson.loads(body)["vectors"]) == BIG
        return response.status_code

    with ServerThread(app) as server, server.client() as big_client, server.client() as small_client:
        warm = len(backend.batches)
        with ThreadPoolExecutor(1) as pool:
            big_status = pool.submit(post_big, big_client)
            server.wait_until(
                lambda: sum(len(b) for b in backend.batches[warm:]) == BIG, "every big batch ran", 60
            )
            answer = small_client.post("/embed", json=small)
            finished["small"] = time.monotonic()
            assert big_status.result() == 200
    assert answer.status_code == 200
    assert finished["small"] < finished["big headers"], finished


class HeldTokenizer(FakeBackend):
    """A fake model whose /tokenize work holds until released (and says when it started)."""

    def __init__(self) -> None:
        super().__init__(ModelKind.BI_ENCODER)
        self.entered = threading.Event()
        self.release = threading.Event()

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[TokenSpan]]:
        self.entered.set()
        self.release.wait(30)
        return [[TokenSpan(7, "word", 0, len(text), False)] for text in texts]


def test_tei_tokenize_runs_off_the_loop_with_the_loaded_models_tokenizer() -> None:
    """Issue 22: /tokenize tokenized on the event loop, with a tokenizer it read by resolving the
    model source again (MODEL_NAME here is a hub id that cannot resolve: that was a 500)."""
    backend = HeldTokenizer()
    app = create_app(make_settings(model_name="nobody/not-a-model"), backend=backend)
    with ServerThread(app) as server, server.client() as client, ThreadPoolExecutor(1) as pool:
        try:
            pending = pool.submit(client.post, "/tokenize", json={"inputs": ["hello", "world"]})
            assert backend.entered.wait(30) or pending.result().status_code != 200, pending.result().text
            assert client.get("/livez").status_code == 200  # answered while the tokenizer works
        finally:
            backend.release.set()
        answer = pending.result()
    assert answer.status_code == 200, answer.text
    assert answer.json() == [
        [{"id": 7, "text": text, "special": False, "start": 0, "stop": 5}] for text in ("hello", "world")
    ]


def test_what_loaded_is_frozen_out_of_the_garbage_collector() -> None:
    """Once its models are loaded the server takes every object alive out of the collector's sight
    (gc.freeze), so that a full collection a request triggers does not walk the libraries and the
    models while the event loop waits: a refusal under load waited for such a pass before."""
    import gc

    gc.unfreeze()
    before = ["alive before the server loaded"]
    with ServerThread(create_app(make_settings(), backend=FakeBackend())) as server:
        assert server.runtime.status.value == "healthy" and gc.get_freeze_count() > 1000
        after = ["allocated while serving"]
        watched = {id(item) for item in gc.get_objects()}  # the collected generations only
    assert id(before) not in watched and id(after) in watched
