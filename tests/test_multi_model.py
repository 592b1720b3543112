"""Several models behind one port (MODELS / MODELS_FILE): parsing, routing, isolation, reports.

Fake backends (one per model) for the routing and fairness checks; the embedded
all-MiniLM-L6-v2 with a tiny BERT cross-encoder from tests/families.py for the real-client
check, each equal to its in-process library.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from reranker.api.app import create_app
from reranker.backends.base import Encoded, ModelKind
from reranker.backends.fake import FakeBackend
from reranker.errors import StartupError
from reranker.model_specs import model_specs
from tests.conftest import make_settings
from tests.server import ServerThread

# ---- MODELS and MODELS_FILE ---------------------------------------------------------------


def test_models_list_names_sources_and_defaults() -> None:
    specs = model_specs(make_settings(models="embed=/models/bge-small, BAAI/bge-reranker-base"))
    assert [(s.name, s.settings.model_source) for s in specs] == [
        ("embed", "/models/bge-small"),
        (None, "BAAI/bge-reranker-base"),
    ]
    assert all(s.settings.dtype == "float32" for s in specs)  # the server's settings, inherited
    one = model_specs(make_settings(model_name="some/model"))
    assert [(s.name, s.settings.model_source) for s in one] == [(None, "some/model")]


def test_models_list_refuses_bad_entries_naming_each() -> None:
    with pytest.raises(StartupError) as refused:
        model_specs(make_settings(models="a=x,=y,b/c=z,"))
    message = refused.value.message
    assert "MODELS entry 1 ('=y')" in message and "MODELS entry 2 ('b/c=z')" in message
    assert "MODELS entry 3 ('')" in message and "MODELS entry 0" not in message
    with pytest.raises(StartupError, match="models share a name: a"):
        model_specs(make_settings(models="a=x,a=y"))


def test_models_file_sets_per_model_settings(tmp_path: Path) -> None:
    yaml_file = tmp_path / "models.yaml"
    yaml_file.write_text(
        "- name: embed\n  source: /m/e5\n  default_prompt_name: query\n  batch_size: 8\n"
        "- name: rerank\n  source: BAAI/bge-reranker-base\n  dtype: bfloat16\n  max_length: 256\n"
    )
    embed, rerank = model_specs(make_settings(models_file=str(yaml_file), batch_size=32))
    assert (embed.name, embed.settings.default_prompt_name, embed.settings.batch_size) == (
        "embed",
        "query",
        8,
    )
    assert "batch_size" in embed.settings.model_fields_set
    assert (rerank.settings.dtype, rerank.settings.max_model_length) == ("bfloat16", 256)
    assert rerank.settings.batch_size == 32
    json_file = tmp_path / "models.json"
    json_file.write_text(json.dumps([{"source": "x"}]))
    assert [s.settings.model_source for s in model_specs(make_settings(models_file=str(json_file)))] == ["x"]


def test_models_file_names_every_bad_entry_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "- name: ok\n  source: x\n"
        "- name: bad\n  source: y\n  dtype: float8\n"
        "- name: typo\n  source: z\n  batchsize: 4\n"
        "- name: nosource\n"
        "- just a string\n"
    )
    with pytest.raises(StartupError) as refused:
        model_specs(make_settings(models_file=str(path)))
    message = refused.value.message
    assert "\n" not in message
    assert "MODELS_FILE entry 1 (bad): dtype='float8'" in message
    assert "MODELS_FILE entry 2: unknown key(s) ['batchsize']" in message
    assert "MODELS_FILE entry 3: 'source'" in message
    assert "MODELS_FILE entry 4: expected an object" in message
    assert "entry 0" not in message
    path.write_text("{not: [valid")
    with pytest.raises(StartupError, match="not YAML"):
        model_specs(make_settings(models_file=str(path)))
    with pytest.raises(StartupError, match="No such file"):
        model_specs(make_settings(models_file=str(tmp_path / "missing.yaml")))


# ---- a server of fake models --------------------------------------------------------------


class RecordingBackend(FakeBackend):
    """A fake that writes every batch it runs, with its model's name, into one shared log, and
    counts how many batches run at the same moment across every model."""

    log: list[tuple[str, int]]
    running: list[int]

    def __init__(self, label: str, kind: ModelKind, log: list, running: list[int], **kwargs: object) -> None:
        super().__init__(kind, **kwargs)
        self.label, self.log, self.running = label, log, running
        self._shared = threading.Lock()

    def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
        with self._shared:
            self.running[0] += 1
            self.running[1] = max(self.running[1], self.running[0])
            self.log.append((self.label, len(batch)))
        try:
            return super().forward(batch)
        finally:
            with self._shared:
                self.running[0] -= 1


MODELS = "embed=fake-embedder,rerank=fake-reranker"


@pytest.fixture()
def two_models() -> Iterator[tuple[ServerThread, dict[str, RecordingBackend], list]]:
    log: list[tuple[str, int]] = []
    running = [0, 0]
    backends = {
        "embed": RecordingBackend("embed", ModelKind.BI_ENCODER, log, running),
        "rerank": RecordingBackend("rerank", ModelKind.CROSS_ENCODER, log, running),
    }
    app = create_app(make_settings(models=MODELS, batch_size=4), backends=backends)
    with ServerThread(app) as server:
        yield server, backends, log


def test_each_route_picks_its_model_by_name_or_by_what_it_can_do(two_models) -> None:
    server, _backends, log = two_models
    rerank_body = {"query": "a b", "documents": ["a b", "c"]}
    with server.client() as client:
        # Without a name: /embed and /v1/embeddings the bi-encoder, /rerank the cross-encoder.
        assert client.post("/v1/embeddings", json={"input": "x"}).json()["model"] == "embed"
        assert client.post("/rerank", json=rerank_body).json()["model"] == "rerank"
        assert client.post("/infinity/rerank", json=rerank_body).json()["model"] == "rerank"
        # By name, in every dialect: the bi-encoder reranks too when named.
        assert client.post("/rerank", json={**rerank_body, "model": "embed"}).json()["model"] == "embed"
        assert (
            client.post("/infinity/rerank", json={**rerank_body, "model": "embed"}).json()["model"] == "embed"
        )
        v1 = client.post("/v1/rerank", json={**rerank_body, "model": "embed"})
        v2 = client.post("/v2/rerank", json={**rerank_body, "model": "rerank"})
        embed = client.post(
            "/embed", json={"batch_id": "b", "model": "embed", "chunks": [{"chunk_id": "1", "content": "x"}]}
        )
        # The source names a model as well as its served name.
        by_source = client.post("/v1/embeddings", json={"input": "x", "model": "fake-embedder"})
        tei = client.post("/rerank", json={"query": "a", "texts": ["a", "b"]})
        tei_embed = client.post("/embed", json={"inputs": "x"})
        info = client.get("/info").json()
    assert v1.status_code == v2.status_code == embed.status_code == 200
    assert embed.json()["model"] == "embed" and by_source.json()["model"] == "fake-embedder"
    assert tei.status_code == tei_embed.status_code == 200
    assert info["model_id"] == "embed"  # TEI's /info: the first model
    ran = {label for label, _ in log}
    assert ran == {"embed", "rerank"}


def test_models_path_prefix_serves_that_model_with_every_route(two_models) -> None:
    server, _backends, _log = two_models
    with server.client() as client:
        scored = client.post("/models/embed/rerank", json={"query": "a", "documents": ["a", "b"]})
        tei_info = client.get("/models/rerank/info").json()
        openai_shape = client.post("/models/embed/v1/embeddings", json={"input": "x", "model": "anything"})
        refused = client.post("/models/rerank/v1/embeddings", json={"input": "x"})
        unknown = client.post("/models/nope/rerank", json={"query": "a", "documents": ["a"]})
    assert scored.json()["model"] == "embed"
    assert "reranker" in tei_info["model_type"] and tei_info["model_id"] == "rerank"
    assert openai_shape.status_code == 200
    assert refused.status_code == 400 and "models that can: ['embed']" in refused.json()["error"]["message"]
    assert unknown.status_code == 404


def test_unknown_model_is_404_listing_the_served_ones_and_incapable_is_400(two_models) -> None:
    import openai

    server, _, _ = two_models
    with server.client() as client:
        unknown = client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"})
        incapable = client.post("/v1/embeddings", json={"input": "x", "model": "rerank"})
        cohere_unknown = client.post(
            "/v2/rerank", json={"model": "rerank-v3.5", "query": "q", "documents": ["d"]}
        )
        metrics = client.get("/metrics").json()
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["served_models"] == ["embed", "rerank"] and "embed, rerank" in error["message"]
    assert cohere_unknown.status_code == 404
    assert incapable.status_code == 400
    assert (
        "'rerank' (cross-encoder) cannot embed; models that can: ['embed']"
        in incapable.json()["error"]["message"]
    )
    assert metrics["failed_requests"]["model_not_found"] == 2
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="text-embedding-3-small", input="x")


def test_one_model_server_keeps_any_model_name_a_migrating_client_sends() -> None:
    app = create_app(make_settings(), backend=FakeBackend(ModelKind.BI_ENCODER))
    with ServerThread(app) as server, server.client() as client:
        answer = client.post("/v1/embeddings", json={"input": "x", "model": "text-embedding-3-small"})
        health = client.get("/health").json()
        unknown_path = client.post("/models/nope/v1/embeddings", json={"input": "x"})
        own_path = client.post("/models/fake/v1/embeddings", json={"input": "x"})
    assert answer.status_code == 200 and "models" not in health
    assert unknown_path.status_code == 404 and own_path.status_code == 200


def test_models_health_and_metrics_name_each_model(two_models) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server, _, _ = two_models
    with server.client() as client:
        client.post("/v1/embeddings", json={"input": ["x", "y"]})
        client.post("/rerank", json={"query": "a", "documents": ["a", "b", "c"]})
        listed = client.get("/v1/models").json()["data"]
        health = client.get("/health").json()
        metrics = client.get("/metrics").json()
        prometheus = client.get("/metrics", params={"format": "prometheus"}).text
        landing = client.get("/").json()
        page = client.get("/", headers={"accept": "text/html"}).text
    assert [m["name"] for m in landing["models"]] == ["embed", "rerank"]
    assert "model rerank" in page and "cross-encoder on fake / cpu" in page
    from aggregate_metrics import aggregate

    cluster = aggregate({"a": metrics, "b": metrics})["models"]
    assert cluster["rerank"] == {
        "total_requests": 2,
        "successful_requests": 2,
        "items_processed": 6,
        "instances": 2,
    }
    assert [(m["id"], m["kind"], m["dimension"], m["dtype"]) for m in listed] == [
        ("embed", "bi-encoder", 8, "float32"),
        ("rerank", "cross-encoder", None, "float32"),
    ]
    assert health["status"] == "healthy" and set(health["models"]) == {"embed", "rerank"}
    assert health["models"]["rerank"]["kind"] == "cross-encoder"
    assert health["models"]["embed"]["status"] == "ready"
    assert metrics["models"]["embed"]["items_processed"] == 2
    assert metrics["models"]["rerank"]["items_processed"] == 3
    assert metrics["items_processed"] == 5
    assert metrics["models"]["embed"]["requests_by_endpoint"]["/v1/embeddings"] == 1
    items = {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(prometheus)
        for sample in family.samples
        if sample.name == "reranker_items_processed_total"
    }
    assert items == {"embed": 2.0, "rerank": 3.0}


def test_a_burst_on_one_model_delays_the_other_by_at_most_one_batch(two_models) -> None:
    """MAX_PARALLEL_REQUESTS=1 is the server's: one batch at a time across both models, and
    the reranker's request, arriving while the embedder has 10 batches to run, runs next."""
    server, backends, log = two_models
    embedder, _reranker = backends["embed"], backends["rerank"]
    runtime = server.runtime
    log.clear()  # each model's warm-up batch
    embedder.batch_started.clear()
    embedder.gate.clear()
    answers: dict[str, httpx.Response] = {}

    def post(name: str, path: str, body: dict) -> None:
        with server.client() as client:
            answers[name] = client.post(path, json=body)

    burst = threading.Thread(
        target=post, args=("burst", "/v1/embeddings", {"input": [f"t{i}" for i in range(40)]})
    )
    burst.start()
    server.wait_until(embedder.batch_started.is_set, "the embedder's first batch")
    small = threading.Thread(target=post, args=("small", "/rerank", {"query": "q", "documents": ["a", "b"]}))
    small.start()
    server.wait_until(lambda: runtime.models[1].controller.queued == 1, "the reranker's request queued")
    embedder.gate.set()
    burst.join(30)
    small.join(30)
    assert answers["burst"].status_code == answers["small"].status_code == 200
    labels = [label for label, _ in log]
    assert log[:2] == [("embed", 4), ("rerank", 2)] and labels.count("embed") == 10, log
    assert backends["embed"].running[1] == 1  # never two batches at once: the threads are shared


def test_jobs_run_on_the_model_they_were_submitted_for(two_models) -> None:
    server, _, _ = two_models
    with server.client() as client:
        rerank = {"type": "rerank", "input": {"model": "embed", "query": "a", "documents": ["a", "b"]}}
        submitted = client.post("/v1/jobs", json=rerank).json()
        server.wait_until(
            lambda: client.get(submitted["status_url"]).json()["status"] == "COMPLETED", "the rerank job"
        )
        embed_job = {
            "type": "embed",
            "input": {"batch_id": "b", "chunks": [{"chunk_id": "1", "content": "x"}]},
        }
        embedded = client.post("/v1/jobs", json=embed_job).json()
        server.wait_until(
            lambda: client.get(embedded["status_url"]).json()["status"] == "COMPLETED", "the embed job"
        )
        embed_output = client.get(embedded["status_url"]).json()["output"]
        wrong = client.post(
            "/v1/jobs", json={"type": "embed", "input": {**embed_job["input"], "model": "rerank"}}
        )
        runpod = client.post("/runsync", json={"input": {"model": "nope", "query": "a", "documents": ["a"]}})
    assert embed_output["model"] == "embed"
    assert wrong.status_code == 400 and runpod.status_code == 404


def test_a_job_for_a_model_this_instance_does_not_serve_fails_saying_so(two_models) -> None:
    import asyncio

    from reranker.engine.job_work import JobSpecError
    from reranker.engine.jobs import Job

    server, _, _ = two_models
    job = Job("j", "embed", 1, spec={"type": "embed", "model": "bge-m3", "input": {}})
    with pytest.raises(JobSpecError, match="for model 'bge-m3', which this instance does not serve"):
        asyncio.run(server.runtime._run_job(job))


# ---- start-up failures name the model -----------------------------------------------------


def test_a_model_that_fails_to_load_names_itself() -> None:
    fatal: list[BaseException] = []

    def factory(settings):
        raise OSError("no such model directory")

    app = create_app(
        make_settings(models="embed=a,rerank=b"),
        backends={"embed": FakeBackend()},
        backend_factory=factory,
        on_fatal=fatal.append,
    )
    with ServerThread(app) as server:  # ready: the load ended (here, in failure)
        error, status = server.runtime.error, server.runtime.status.value
        health = server.client().get("/health").json()
    assert status == "unhealthy"
    assert error == "model rerank failed to load: no such model directory"
    assert [str(e) for e in fatal] == [error]
    assert health["models"]["rerank"]["status"] == "failed"


def test_two_models_with_the_same_own_name_must_be_named() -> None:
    app = create_app(make_settings(models="x,y"), backend_factory=lambda settings: FakeBackend())
    with ServerThread(app) as server:  # ready: the load ended (here, in failure)
        error = server.runtime.error
    assert error == "models share a name: fake (name them: MODELS=NAME=SOURCE,...)"


def test_models_that_do_not_fit_the_memory_limit_fail_the_start(monkeypatch) -> None:
    import dataclasses

    app = create_app(make_settings(models=MODELS), backends={"embed": FakeBackend(), "rerank": FakeBackend()})
    runtime = app.state.runtime
    runtime.resources = dataclasses.replace(runtime.resources, memory_bytes=1 << 20, memory_because="test")
    with ServerThread(app) as server:  # ready: the load ended (here, in failure)
        error = server.runtime.error or ""
    assert error.startswith("the models do not fit the memory limit:")
    assert "embed 0.00 GiB, rerank 0.00 GiB) of 0.00 GiB (test)" in error


# ---- real models: the embedded bi-encoder and a tiny cross-encoder in one server ----------


@pytest.fixture(scope="module")
def rag_server(embedded_path: Path, family_model) -> Iterator[tuple[ServerThread, Path]]:
    cross = family_model("bert-cross")
    settings = make_settings(models=f"embed={embedded_path},rerank={cross}")
    with ServerThread(create_app(settings)) as server:
        assert server.runtime.status.value == "healthy", server.runtime.error
        yield server, cross


def test_one_base_url_serves_both_models_equal_to_their_libraries(rag_server, sentence_transformer) -> None:
    """The OpenAI and Cohere SDKs against one base URL: embeddings equal to sentence-transformers,
    rerank scores equal to CrossEncoder.predict, TEI's model-less routes find the right model."""
    import cohere
    import openai
    from sentence_transformers import CrossEncoder

    from tests.families import DOCUMENTS, QUERY

    server, cross = rag_server
    texts = [QUERY, *DOCUMENTS]
    expected_vectors = sentence_transformer.encode(texts, normalize_embeddings=True)
    expected_scores = CrossEncoder(str(cross), device="cpu").predict([(QUERY, d) for d in DOCUMENTS])

    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    embedded = sdk.embeddings.create(model="embed", input=texts)
    assert embedded.model == "embed"
    np.testing.assert_allclose([d.embedding for d in embedded.data], expected_vectors, atol=1e-5)

    reranked = cohere.ClientV2(base_url=server.url, api_key="unused").rerank(
        model="rerank", query=QUERY, documents=DOCUMENTS
    )
    scores = {r.index: r.relevance_score for r in reranked.results}
    np.testing.assert_allclose([scores[i] for i in range(len(DOCUMENTS))], expected_scores, atol=1e-5)

    with server.client() as client:
        tei_embed = client.post("/embed", json={"inputs": texts}).json()
        tei_rerank = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS}).json()
        infinity = client.post("/infinity/embeddings", json={"model": "embed", "input": texts}).json()
        prefixed = client.post(
            "/models/rerank/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS}
        ).json()
    np.testing.assert_allclose(tei_embed, expected_vectors, atol=1e-5)
    np.testing.assert_allclose(
        sorted(r["score"] for r in tei_rerank), sorted(expected_scores.tolist()), atol=1e-5
    )
    np.testing.assert_allclose([d["embedding"] for d in infinity["data"]], expected_vectors, atol=1e-5)
    prefixed_scores = {r["index"]: r["relevance_score"] for r in prefixed["results"]}
    np.testing.assert_allclose(
        [prefixed_scores[i] for i in range(len(DOCUMENTS))], expected_scores, atol=1e-5
    )


def test_a_waiter_cancelled_as_the_gate_is_released_passes_the_slot_on() -> None:
    """Cancelling a waiter in the same loop turn as a release: CancelledError for it, the slot to
    the next waiter (not a ValueError that would kill a batcher)."""
    import asyncio

    from reranker.engine.controller import DeviceGate

    async def scenario() -> tuple[str, bool]:
        gate = DeviceGate(1)
        await gate.acquire()
        first = asyncio.ensure_future(gate.acquire())
        second = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)  # both wait
        first.cancel()
        gate.release()
        outcome = await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)
        return type(outcome[0]).__name__, second.done() and second.exception() is None

    assert asyncio.run(scenario()) == ("CancelledError", True)


def test_requests_refused_before_a_model_is_chosen_count_apart(two_models) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server, _, _ = two_models
    with server.client() as client:
        client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
        client.post("/rerank", json={"query": "q"})  # 422 before routing
        text = client.get("/metrics", params={"format": "prometheus"}).text
    refused = {
        (sample.labels["model"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "reranker_request_failures_total" and sample.value
    }
    assert refused == {("", "model_not_found"): 1.0, ("", "invalid_request"): 1.0}


class TokenVectorFake(FakeBackend):
    """A fake bi-encoder that also gives token vectors (as the torch backend does)."""

    serves_token_vectors = True

    def token_vectors(self, batch: Sequence[Encoded]) -> np.ndarray:
        answer = np.empty(len(batch), dtype=object)
        answer[:] = [np.ones((len(item), 4), dtype=np.float32) for item in batch]
        return answer


def test_embed_all_without_a_model_goes_to_the_first_model_that_gives_token_vectors() -> None:
    backends = {"plain": FakeBackend(), "tokens": TokenVectorFake()}
    app = create_app(make_settings(models="plain=a,tokens=b"), backends=backends)
    with ServerThread(app) as server, server.client() as client:
        answer = client.post("/embed_all", json={"inputs": ["one two three", "four"]})
        refused = client.post("/models/plain/embed_all", json={"inputs": "x"})
        health = client.get("/health").json()["models"]["tokens"]["controller"]
    assert answer.status_code == 200 and [len(vectors) for vectors in answer.json()] == [3, 1]
    assert refused.status_code == 400 and "BACKEND=torch" in refused.json()["error"]  # TEI's error shape
    assert health["queued"] == 0 and health["in_flight"] == 0


def test_health_reads_a_backends_details_when_asked_not_once_at_load() -> None:
    """A GPU backend's details carry the device memory in use: /health must show today's figure."""
    from dataclasses import replace

    class Changing(FakeBackend):
        held = 0

        def info(self):  # type: ignore[no-untyped-def]
            return replace(super().info(), details={"device_memory_allocated_mib": str(self.held)})

    backend = Changing(ModelKind.BI_ENCODER)
    with ServerThread(create_app(make_settings(), backend=backend)) as server, server.client() as client:
        assert client.get("/health").json()["model"]["details"]["device_memory_allocated_mib"] == "0"
        backend.held = 700
        assert client.get("/health").json()["model"]["details"]["device_memory_allocated_mib"] == "700"
