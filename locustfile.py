"""Load for performance_test.sh: rerank and embed requests against a running server or nginx.

Documents are realistic and reproducible: MS MARCO passages from ../shared/data when
present, else generated prose, cut to 20-60 words, drawn with a fixed seed. Each user
stops after the run has sent PERF_REQUESTS requests; at the end the run's summary
(requests, success rate, 503 refusals, errors, latency percentiles, requests/s, items/s)
is written to PERF_RESULTS_DIR/summary.json and summary.txt (with locust's final
locust_stats.csv and locust_failures.csv beside them), and the exit code says
whether it met PERF_MIN_SUCCESS and PERF_MAX_P95_MS.

Settings (environment, set by performance_test.sh): PERF_MODE, PERF_REQUESTS,
PERF_DOCS (texts per request, default 10), PERF_TASKS (rerank | embed | mixed),
PERF_SEED, PERF_MIN_SUCCESS (percent), PERF_MAX_P95_MS, PERF_MAX_REFUSAL_MS (stress),
PERF_RESULTS_DIR, PERF_TIMEOUT_S (per request), PERF_CAN_EMBED (1 when the model embeds:
the script reads /health once, so locust's statistics hold the measured requests only),
RERANKER_API_KEY (sent as a Bearer token).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import gevent
import numpy as np
from locust import events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.exception import StopUser
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
SHARED_CORPUS = SHARED_DATA / "trec-dl19-subset" / "corpus.jsonl"
QUERIES = [
    "how long does a broken bone take to heal",
    "what is the capital of australia",
    "symptoms of vitamin d deficiency",
    "how do solar panels produce electricity",
    "best way to store fresh basil",
    "what causes the northern lights",
    "how much protein should an adult eat per day",
    "difference between a virus and a bacterium",
]
FALLBACK_PROSE = (
    "the of and a to in is was for on that with as by at from it an be this which are or "
    "his has have had not were but they their one all been can also more when there its "
    "who new time after first two years other into used most some people over such only "
    "than these water energy body cells light system heat process area health power food"
)


def setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


class Run:
    """What the whole run sent and got back (one per locust process)."""

    def __init__(self) -> None:
        self.target = int(setting("PERF_REQUESTS", "100"))
        self.tickets = itertools.count()
        self.done = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.latencies_ok: list[float] = []
        self.latencies_refused: list[float] = []
        self.statuses: dict[str, int] = {}
        self.items = 0
        self.tasks = setting("PERF_TASKS", "mixed")
        self.rng = random.Random(int(setting("PERF_SEED", "42")))
        self.passages = self._passages()

    def _passages(self) -> list[str]:
        if SHARED_CORPUS.is_file():
            with open(SHARED_CORPUS, encoding="utf-8") as corpus:
                texts = [json.loads(line)["text"] for line in itertools.islice(corpus, 3000)]
        else:
            texts = [" ".join(self.rng.choices(FALLBACK_PROSE.split(" "), k=70)) for _ in range(3000)]
        return [" ".join(t.split()[: self.rng.randint(20, 60)]) for t in texts if len(t.split()) >= 20]

    def documents(self, rng: random.Random) -> list[str]:
        return rng.sample(self.passages, int(setting("PERF_DOCS", "10")))

    def take_ticket(self) -> bool:
        return next(self.tickets) < self.target

    def record(self, status: int | None, latency_ms: float, items: int) -> None:
        now = time.perf_counter()
        self.finished_at = now
        key = str(status) if status else "no_response"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status == 200:
            self.latencies_ok.append(latency_ms)
            self.items += items
        elif status == 503:
            self.latencies_refused.append(latency_ms)
        self.done += 1


RUN = Run()


class InferenceUser(FastHttpUser):
    network_timeout = float(setting("PERF_TIMEOUT_S", "60"))
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random(RUN.rng.random())
        key = setting("RERANKER_API_KEY", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        can_embed = setting("PERF_CAN_EMBED", "1") == "1"
        choices = {"rerank": ["rerank"], "embed": ["embed"], "mixed": ["rerank"] * 3 + ["embed"]}[RUN.tasks]
        self.choices = [c for c in choices if c == "rerank" or can_embed] or ["rerank"]

    @task
    def one_request(self) -> None:
        if not RUN.take_ticket():
            raise StopUser()
        if RUN.started_at is None:
            RUN.started_at = time.perf_counter()
        documents = RUN.documents(self.rng)
        if self.rng.choice(self.choices) == "rerank":
            path, body = "/v1/rerank", {"query": self.rng.choice(QUERIES), "documents": documents}
        else:
            path, body = "/v1/embeddings", {"input": documents, "model": "default"}
        started = time.perf_counter()
        with self.client.post(path, json=body, headers=self.headers, catch_response=True) as response:
            latency_ms = (time.perf_counter() - started) * 1000
            status = response.status_code or None
            if status == 200:
                response.success()
            elif status == 503:
                response.failure("rejected: 503 overloaded")
            elif status == 401:
                response.failure("401 unauthorized: pass --api-key KEY or set RERANKER_API_KEY")
            else:
                response.failure(f"HTTP {status}: {(response.text or '')[:200]}")
        RUN.record(status, latency_ms, len(documents))
        if RUN.done >= RUN.target:
            gevent.spawn(self.environment.runner.quit)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarize(run: Run) -> dict[str, Any]:
    mode = setting("PERF_MODE", "load")
    total = run.done
    ok = len(run.latencies_ok)
    refused = len(run.latencies_refused)
    errors = total - ok - refused
    seconds = (run.finished_at - run.started_at) if run.started_at and run.finished_at else 0.0
    # Under stress a fast 503 is the right answer; elsewhere only a 200 is a success.
    answered = ok + refused if mode == "stress" else ok
    success = answered / total if total else 0.0
    p95 = percentile(run.latencies_ok, 95)
    refusal_p95 = percentile(run.latencies_refused, 95)
    min_success = float(setting("PERF_MIN_SUCCESS", "99")) / 100
    max_p95 = float(setting("PERF_MAX_P95_MS", "") or 0) or None
    max_refusal = float(setting("PERF_MAX_REFUSAL_MS", "250"))
    failures = []
    if success < min_success:
        failures.append(f"success {success:.2%} < {min_success:.0%}")
    if run.statuses.get("401"):
        failures.append(
            f"{run.statuses['401']} requests refused as unauthorized (401): "
            "pass --api-key KEY or set RERANKER_API_KEY"
        )
    if max_p95 is not None and (p95 is None or p95 > max_p95):
        failures.append(f"p95 {p95} ms > {max_p95:g} ms")
    if mode == "stress":
        if refused == 0:
            failures.append("no 503 refusal: the load never passed MAX_QUEUE_SIZE")
        if refusal_p95 is not None and refusal_p95 > max_refusal:
            failures.append(f"refusals are slow: p95 {refusal_p95} ms > {max_refusal:g} ms")
    return {
        "mode": mode,
        "requests": total,
        "successful": ok,
        "rejected_503": refused,
        "errors": errors,
        "statuses": run.statuses,
        "success_rate": round(success, 6),
        "latency_ms": {f"p{q}": percentile(run.latencies_ok, q) for q in (50, 95, 99)},
        "refusal_latency_ms": {"p50": percentile(run.latencies_refused, 50), "p95": refusal_p95},
        "seconds": round(seconds, 3),
        "requests_per_s": round(total / seconds, 2) if seconds else None,
        "items_per_s": round(run.items / seconds, 1) if seconds else None,
        "passed": not failures,
        "failures": failures,
    }


def render(summary: dict[str, Any]) -> str:
    latency = summary["latency_ms"]
    lines = [
        f"requests {summary['requests']}  success {summary['success_rate']:.2%}  "
        f"rejected (503) {summary['rejected_503']}  errors {summary['errors']}  "
        f"statuses {summary['statuses']}",
        f"latency ms (successful)  p50 {latency['p50']}  p95 {latency['p95']}  p99 {latency['p99']}",
        f"throughput  {summary['requests_per_s']} requests/s  {summary['items_per_s']} items/s"
        f"  over {summary['seconds']} s",
    ]
    if summary["rejected_503"]:
        refusal = summary["refusal_latency_ms"]
        lines.append(f"503 refusals  p50 {refusal['p50']} ms  p95 {refusal['p95']} ms")
    lines.append("PASS" if summary["passed"] else "FAIL: " + "; ".join(summary["failures"]))
    return "\n".join(lines)


@events.quitting.add_listener
def write_summary(environment: Environment, **_: Any) -> None:
    summary = summarize(RUN)
    results = Path(setting("PERF_RESULTS_DIR", "."))
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "summary.txt").write_text(render(summary) + "\n")
    # Locust's own --csv files are rewritten once a second and not at exit, so they can miss the
    # last second of the run; these are written from its final statistics, like the summary.
    tables = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for name, write in (("stats", tables.requests_csv), ("failures", tables.failures_csv)):
        with open(results / f"locust_{name}.csv", "w", newline="", encoding="utf-8") as table:
            write(csv.writer(table))
    environment.process_exit_code = 0 if summary["passed"] else 1
