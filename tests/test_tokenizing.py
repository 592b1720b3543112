"""Where and how texts are tokenized: one call on the loop for a lone small request, a thread
under load, chunks over the CPUs for a large one, never the tokenizers' shared Rayon pool."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from tokenizers import Tokenizer

from reranker.api.app import create_app
from reranker.backends import threads, tokenization
from reranker.backends.base import Encoded, ModelKind
from reranker.backends.fake import FakeBackend
from reranker.backends.source import embedded_model_path
from reranker.backends.tokenization import TextTokenizer, spread_small_inputs
from tests.conftest import make_settings
from tests.server import ServerThread

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def texts(count: int) -> list[str]:
    return [" ".join(WORDS[(i * 3) % len(WORDS) :] + WORDS[: i % 7]) * (1 + i % 5) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_file(embedded_model_path() / "tokenizer.json", max_length=32, pad_id=0)


@pytest.fixture
def three_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenization, "tokenizer_threads", lambda: 3)


def reference(inputs: list) -> list[list[int]]:  # type: ignore[type-arg]
    plain = Tokenizer.from_file(str(embedded_model_path() / "tokenizer.json"))
    plain.enable_truncation(max_length=32)
    plain.no_padding()
    return [e.ids for e in plain.encode_batch(inputs)]


@pytest.mark.usefixtures("three_cpus")
@pytest.mark.parametrize("count", [1, 5, 16, 17, 50])
def test_chunked_and_spread_encodings_equal_one_call_in_order(tokenizer: TextTokenizer, count: int) -> None:
    inputs = texts(count)
    expected = reference(inputs)
    assert [e.ids.tolist() for e in tokenizer.texts(inputs)] == expected
    token = spread_small_inputs.set(True)
    try:
        assert [e.ids.tolist() for e in tokenizer.texts(inputs)] == expected
    finally:
        spread_small_inputs.reset(token)
    pairs = [("a query", text) for text in inputs]
    assert [e.ids.tolist() for e in tokenizer.pairs(pairs)] == reference(pairs)


@pytest.mark.usefixtures("three_cpus")
def test_a_large_input_is_spread_over_the_cpus_a_small_one_only_when_asked(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    inner = tokenizer._tokenizer

    class Recording:
        def encode_batch_fast(self, inputs: list) -> list:  # type: ignore[type-arg]
            calls.append((threading.current_thread().name, len(inputs)))
            return inner.encode_batch_fast(inputs)

    monkeypatch.setattr(tokenizer, "_tokenizer", Recording())
    tokenizer.texts(texts(8))
    assert calls == [(threading.current_thread().name, 8)]
    calls.clear()
    caller = threading.current_thread().name
    tokenizer.texts(texts(50))
    assert sorted(size for _, size in calls) == [16, 17, 17]
    # Each chunk on the large inputs' threads, or on the caller when no thread had started it.
    assert {name for name, _ in calls} <= {caller, "tokenize-large_0", "tokenize-large_1"}
    calls.clear()
    token = spread_small_inputs.set(True)
    try:
        tokenizer.texts(texts(8))
    finally:
        spread_small_inputs.reset(token)
    assert sorted(size for _, size in calls) == [2, 3, 3]
    # The loop waits for these: their own threads, never queued behind a large input's chunks.
    assert {name for name, _ in calls} <= {caller, "tokenize-small_0", "tokenize-small_1"}


def test_configure_turns_the_tokenizers_shared_pool_off_and_spreads_over_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    before = torch.get_num_threads()
    try:
        threads.configure(1, cpus=6)  # one thread a batch; tokenization spreads over all 6 CPUs
        assert threads.tokenizer_threads() == 6
    finally:
        threads.configure(before)
        torch.set_num_threads(before)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_configure_keeps_enough_compiled_onednn_kernels_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half-precision batch shapes outnumber oneDNN's default 1,024 cached kernels (threads.py)."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    threads.configure(before)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(threads.ONEDNN_KERNEL_CACHE) == "4096"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "100")
    threads.configure(before)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "100"


def test_a_query_that_leaves_less_room_than_the_overlap_falls_back_to_truncation(
    tokenizer: TextTokenizer,
) -> None:
    """tokenizers panics (a BaseException, not an Exception) when the stride is not below the
    room a long query leaves for the document: that is the plain-truncation case, not a 500."""
    query, document = " ".join(["word"] * 28), " ".join(["other"] * 200)
    for overlap in (0, 8, 40):
        (windows,) = tokenizer.pair_windows([(query, document)], overlap, 4)
        assert len(windows.items) >= 1
        assert all(len(item) <= 32 for item in windows.items)


class WhereTokenized(FakeBackend):
    """Records the thread each tokenization ran on."""

    def __init__(self) -> None:
        super().__init__(ModelKind.BI_ENCODER)
        self.threads: list[str] = []

    def tokenize_texts(self, texts: Sequence[str]) -> list[Encoded]:
        self.threads.append(threading.current_thread().name)
        return super().tokenize_texts(texts)


def test_a_lone_small_request_is_tokenized_on_the_loop_one_under_load_on_a_thread() -> None:
    backend = WhereTokenized()
    with ServerThread(create_app(make_settings(), backend=backend)) as server, server.client() as client:
        loop_thread = server._thread.name  # uvicorn's loop runs on the server thread
        backend.threads.clear()
        assert client.post("/v1/embeddings", json={"input": ["alone"]}).status_code == 200
        assert backend.threads == [loop_thread]

        backend.threads.clear()
        backend.gate.clear()  # the first request's batch holds: it stays in computation
        backend.batch_started.clear()  # a batch at load (calibration probes) set it already
        with ThreadPoolExecutor(2) as pool, server.client() as second:
            first = pool.submit(client.post, "/v1/embeddings", json={"input": ["first"]})
            server.wait_until(backend.batch_started.is_set, "the first batch started", 30)
            later = pool.submit(second.post, "/v1/embeddings", json={"input": ["while busy"]})
            server.wait_until(lambda: len(backend.threads) == 2, "the second request tokenized", 30)
            backend.gate.set()
            assert first.result().status_code == 200
            assert later.result().status_code == 200
    assert backend.threads[0] == loop_thread
    assert backend.threads[1].startswith("tokenize-req")


def test_a_large_request_is_tokenized_on_its_own_threads_apart_from_small_ones() -> None:
    """Large requests queue for the model's ``tokenize-big`` threads (one per CPU), never on a
    thread of their own each (64 of them at once thrashed the cores) nor behind small requests."""
    backend = WhereTokenized()
    with ServerThread(create_app(make_settings(), backend=backend)) as server, server.client() as client:
        backend.threads.clear()
        many = [f"text {i}" for i in range(40)]  # over the small-request limit
        assert client.post("/v1/embeddings", json={"input": many}).status_code == 200
        service = server.runtime.default.require_service()
        assert set(service._tokenizing_pools) == {"tokenize-big"}
    assert len(backend.threads) == 1 and backend.threads[0].startswith("tokenize-big")


def test_a_full_queue_refuses_before_tokenizing() -> None:
    backend = WhereTokenized()
    app = create_app(make_settings(max_queue_size=1), backend=backend)
    with ServerThread(app) as server, ThreadPoolExecutor(2) as pool:
        backend.threads.clear()
        backend.gate.clear()
        backend.batch_started.clear()  # a batch at load (calibration probes) set it already
        with server.client() as first_client, server.client() as second_client, server.client() as third:
            first = pool.submit(first_client.post, "/v1/embeddings", json={"input": ["running"]})
            server.wait_until(backend.batch_started.is_set, "the first batch started", 30)
            second = pool.submit(second_client.post, "/v1/embeddings", json={"input": ["waiting"]})
            server.wait_until(lambda: server.runtime.default.controller.queued == 1, "one queued", 30)
            refused = third.post("/v1/embeddings", json={"input": ["refused"]})
            assert refused.status_code == 503
            assert len(backend.threads) == 2  # the refused request was never tokenized
            backend.gate.set()
            assert first.result().status_code == second.result().status_code == 200


def test_a_closed_service_refuses_tokenizing_with_not_ready() -> None:
    """After the server stops, a request still reaching the tokenizing threads is a 503, never a
    RuntimeError from a shut-down pool (a 500)."""
    from reranker.errors import NotReadyError

    backend = WhereTokenized()
    with ServerThread(create_app(make_settings(), backend=backend)) as server:
        service = server.runtime.default.require_service()
        assert service._tokenizing("tokenize-req") is service._tokenizing("tokenize-req")  # made once
    for pool in ("tokenize-req", "tokenize-big"):
        with pytest.raises(NotReadyError, match="shutting down"):
            service._tokenizing(pool)


@pytest.mark.usefixtures("three_cpus")
def test_a_large_input_spreads_only_over_the_cpus_no_other_call_is_encoding_on(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load every CPU encodes some request: chunks there would only slow each other down."""
    calls: list[tuple[str, int]] = []
    inner = tokenizer._tokenizer
    entered, release = threading.Event(), threading.Event()

    class Recording:
        def encode_batch_fast(self, inputs: list) -> list:  # type: ignore[type-arg]
            if threading.current_thread().name == "other request":
                entered.set()
                release.wait(30)
            else:
                calls.append((threading.current_thread().name, len(inputs)))
            return inner.encode_batch_fast(inputs)

    monkeypatch.setattr(tokenizer, "_tokenizer", Recording())
    other = threading.Thread(target=tokenizer.texts, args=(texts(8),), name="other request")
    other.start()
    try:
        assert entered.wait(30)
        tokenizer.texts(texts(50))  # one of the 3 CPUs is encoding the other request
        assert sorted(size for _, size in calls) == [25, 25]
    finally:
        release.set()
        other.join(30)
    calls.clear()
    tokenizer.texts(texts(50))  # nothing else encoding: every CPU
    assert sorted(size for _, size in calls) == [16, 17, 17]


@pytest.mark.usefixtures("three_cpus")
def test_a_spread_chunk_no_thread_has_started_is_encoded_by_the_caller(tokenizer: TextTokenizer) -> None:
    """The CPUs busy elsewhere (here: every spreading thread held): the caller, the event loop
    among them, encodes the chunks itself instead of waiting for a thread to be scheduled."""
    held = threading.Event()
    pool = tokenization._pool("small", 2)
    blockers = [pool.submit(held.wait, 30) for _ in range(2)]
    token = spread_small_inputs.set(True)
    try:
        encoded = tokenizer.texts(texts(8))
        assert not any(blocker.done() for blocker in blockers)  # done while they still hold
    finally:
        spread_small_inputs.reset(token)
        held.set()
    assert all(blocker.result() for blocker in blockers)
    assert [e.ids.tolist() for e in encoded] == reference(texts(8))


def test_a_batch_is_padded_to_its_multiple_never_past_the_model_length(tokenizer: TextTokenizer) -> None:
    """pad_multiple rounds a batch's width up (half precision: fewer kernel shapes); the padding is
    masked, the real tokens unchanged; the width stops at max_length (32 here)."""
    batch = tokenizer.texts(["a short text", "a somewhat longer text than the first one"])
    plain = tokenizer.collate(batch)
    tokenizer.pad_multiple = 8
    try:
        padded = tokenizer.collate(batch)
        widest = tokenizer.collate(tokenizer.texts([" ".join(WORDS * 3)]))  # truncated to 32
        almost = tokenizer.collate(tokenizer.texts([" ".join(WORDS[:12])]))
    finally:
        tokenizer.pad_multiple = 1
    width = plain["input_ids"].shape[1]
    assert width % 8 and padded["input_ids"].shape[1] == -(-width // 8) * 8
    for name, array in plain.items():
        assert (padded[name][:, :width] == array).all()
        assert (padded[name][:, width:] == 0).all()  # pad id 0, mask 0, type 0
    assert widest["input_ids"].shape[1] == 32
    assert almost["input_ids"].shape[1] == 16 and almost["attention_mask"].sum() == 14
