"""The engine alone: this server around a zero-cost model against a minimal server doing the same work.

    .venv/bin/python -m benchmarks.bench_engine [--seconds 5] [--rounds 2] [--endpoints embeddings,rerank]

Two servers run side by side (each its own process, uvicorn + httptools + uvloop), and take
turns under load (alternating rounds, never loaded at the same time):

- **this server**: ``create_app`` with default settings (request log at INFO included, to
  /dev/null) around ``ZeroCostBackend``: the embedded model's own fast tokenizer (truncation
  at its 256 tokens, windows for long documents as always) and a forward pass that returns
  zeros of the right shape ([n, 384]) at once. Everything but the model runs: HTTP, JSON
  parsing and validation, tokenization, the controller's queue and batching, post-processing,
  rendering.
- **minimal server**: one Starlette endpoint per route on the same uvicorn, doing the work a
  request needs and nothing else: ``orjson.loads``, the same tokenizer's ``encode_batch`` on the
  event loop, a NumPy array of token ids, an OpenAI-shaped answer of 384-dim zero vectors (or a
  Cohere-shaped ranking), rendered by orjson. No queue, no cross-request batching.
- **minimal + hand-off** (``--handoff``, a third column): the minimal server, but its zero
  forward pass runs in a worker thread (``run_in_executor``) as any server that keeps its event
  loop free of the model must run it. The gap between the two minimal servers is what one
  hand-off to a thread and back costs on this machine (the GIL passes twice, a thread is woken
  each way): the floor of this server's ratio at one connection, where nothing overlaps it.

Load comes from ``wrk`` (Debian's C HTTP benchmark, one thread, a Lua script cycling through
200 prepared bodies of texts of 20-60 words), on the same cores as the servers: it is far
cheaper per request than either server, so it does not decide the result. Prints req/s,
texts/s, p50 and p99 per cell, and the ratio of this server's req/s to the minimal one's
(best of the rounds for both, each round's figures listed too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import free_port, load_passages_and_queries

DIMENSION = 384
BODIES = 200
CONNECTIONS = (1, 16, 64)
TEXTS = (8, 64)
ENDPOINTS = {"embeddings": "/v1/embeddings", "rerank": "/v1/rerank"}


# ---- the two servers (run as ``--serve this|minimal --port N``) -------------------------------


def _tokenizer_file() -> Path:
    from reranker.backends.source import embedded_model_path

    return embedded_model_path() / "tokenizer.json"


def zero_cost_backend():  # imported lazily: the load side needs none of this
    from reranker.backends.base import Encoded, ModelInfo, ModelKind
    from reranker.backends.tokenization import TextTokenizer, TokenizedBackend

    class ZeroCostBackend(TokenizedBackend):
        """The embedded model's tokenizer; a forward pass that costs nothing."""

        def __init__(self) -> None:
            self.tokenizer = TextTokenizer.from_file(_tokenizer_file(), max_length=256, pad_id=0)
            self._info = ModelInfo(
                name="zero-cost-minilm",
                kind=ModelKind.BI_ENCODER,
                backend="zero",
                device="none",
                max_length=256,
                dimension=DIMENSION,
            )

        def info(self) -> ModelInfo:
            return self._info

        def forward(self, batch: Sequence[Encoded]) -> np.ndarray:
            return np.zeros((len(batch), DIMENSION), dtype=np.float32)

    return ZeroCostBackend()


def serve_this(port: int) -> None:
    import uvicorn

    from reranker.api.app import create_app
    from reranker.logging_setup import configure_logging
    from reranker.protocol import uvicorn_config
    from reranker.settings import load_settings

    settings = load_settings(overrides={"port": port, "host": "127.0.0.1"})
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, backend=zero_cost_backend())
    uvicorn.Server(uvicorn_config(app, settings)).run()


def minimal_app(handoff: bool = False):
    import asyncio
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import orjson
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_tokenizer_file()))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="inference")

    async def forward(rows: int) -> np.ndarray:
        if not handoff:
            return np.zeros((rows, DIMENSION), dtype=np.float32)
        return await asyncio.get_running_loop().run_in_executor(
            model_thread, np.zeros, (rows, DIMENSION), np.float32
        )

    def encode(texts: list[str]) -> tuple[list[np.ndarray], int]:
        ids = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]
        return ids, sum(len(i) for i in ids)

    def answer(content: dict) -> Response:
        body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json")

    async def embeddings(request: Request) -> Response:
        data = orjson.loads(await request.body())
        texts = data["input"] if isinstance(data["input"], list) else [data["input"]]
        _, tokens = encode(texts)
        vectors = await forward(len(texts))
        return answer(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "model": data.get("model") or "minimal",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def rerank(request: Request) -> Response:
        data = orjson.loads(await request.body())
        documents = data["documents"]
        _, tokens = encode([data["query"], *documents])
        if handoff:
            await forward(len(documents) + 1)
        scores = np.zeros(len(documents), dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[: data.get("top_n") or len(documents)]
        return answer(
            {
                "id": str(uuid.uuid4()),
                "results": [{"index": int(i), "relevance_score": float(scores[i])} for i in order],
                "meta": {"api_version": {"version": "1"}},
                "usage": {"total_tokens": tokens},
            }
        )

    async def health(request: Request) -> Response:
        return answer({"status": "healthy"})

    return Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/rerank", rerank, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def serve_minimal(port: int, handoff: bool = False) -> None:
    import uvicorn

    uvicorn.run(minimal_app(handoff), host="127.0.0.1", port=port, http="httptools", log_level="warning")


# ---- the load side ---------------------------------------------------------------------------


@dataclass
class Cell:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def make_bodies(endpoint: str, texts: int, seed: int = 0) -> list[bytes]:
    passages, queries = load_passages_and_queries(seed)
    rng = random.Random(seed)
    words = " ".join(passages[:3000]).split()

    def text() -> str:
        return " ".join(rng.choices(words, k=rng.randint(20, 60)))

    bodies = []
    for _ in range(BODIES):
        if endpoint == "embeddings":
            bodies.append({"input": [text() for _ in range(texts)], "model": "bench"})
        else:
            bodies.append({"query": rng.choice(queries), "documents": [text() for _ in range(texts)]})
    return [json.dumps(body).encode() for body in bodies]


LUA = """
local bodies = {%(bodies)s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"errors": %%d}\\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def write_script(directory: Path, endpoint: str, texts: int) -> Path:
    bodies = ",\n".join(f"[==[{body.decode()}]==]" for body in make_bodies(endpoint, texts))
    path = directory / f"{endpoint}-{texts}.lua"
    path.write_text(LUA % {"bodies": bodies, "path": ENDPOINTS[endpoint]})
    return path


def run_wrk(url: str, script: Path, connections: int, seconds: float) -> Cell:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script)]
    command.append(url)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    return Cell(
        requests_per_s=result["requests"] / (result["duration_us"] / 1e6),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        errors=result["errors"],
    )


def start_server(which: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_engine", "--serve", which, "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {which} server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the {which} server did not become healthy")


def best(cells: list[Cell]) -> Cell:
    return max(cells, key=lambda c: c.requests_per_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=["this", "minimal", "handoff"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help="load per cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--endpoints", default="embeddings,rerank")
    parser.add_argument("--connections", default=",".join(map(str, CONNECTIONS)))
    parser.add_argument("--texts", default=",".join(map(str, TEXTS)))
    parser.add_argument(
        "--handoff", action="store_true", help="also run the minimal server with its forward in a thread"
    )
    args = parser.parse_args()
    if args.serve == "this":
        return serve_this(args.port)
    if args.serve in ("minimal", "handoff"):
        return serve_minimal(args.port, handoff=args.serve == "handoff")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    endpoints = args.endpoints.split(",")
    connections = [int(c) for c in args.connections.split(",")]
    text_counts = [int(t) for t in args.texts.split(",")]
    names = ["this", "minimal", *(["handoff"] if args.handoff else [])]
    servers = {name: start_server(name) for name in names}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: dict[tuple[str, int, int, str], list[Cell]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scripts = {(e, t): write_script(Path(tmp), e, t) for e in endpoints for t in text_counts}
            for script in scripts.values():  # warm every server up (first-call costs)
                for _, url in servers.values():
                    run_wrk(url, script, 4, 1)
            for round_number in range(args.rounds):
                order = names if round_number % 2 == 0 else names[::-1]
                for endpoint in endpoints:
                    for texts in text_counts:
                        for conns in connections:
                            for name in order:
                                script = scripts[endpoint, texts]
                                cell = run_wrk(servers[name][1], script, conns, args.seconds)
                                results.setdefault((endpoint, texts, conns, name), []).append(cell)
                print(f"round {round_number + 1} done; load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"\n{'endpoint':<11} {'texts':>5} {'conns':>5} | {'this req/s':>10} {'texts/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} | {'min req/s':>9} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5}"
        + (f" | {'hand-off req/s':>14} {'h/min':>5}" if args.handoff else "")
        + "  rounds"
    )
    for endpoint in endpoints:
        for texts in text_counts:
            for conns in connections:
                ours = results[endpoint, texts, conns, "this"]
                theirs = results[endpoint, texts, conns, "minimal"]
                a, b = best(ours), best(theirs)
                errors = sum(c.errors for c in ours + theirs)
                pairs = zip(ours, theirs, strict=True)
                rounds = "/".join(f"{x.requests_per_s:.0f}:{y.requests_per_s:.0f}" for x, y in pairs)
                handoff = ""
                if args.handoff:
                    floor = best(results[endpoint, texts, conns, "handoff"]).requests_per_s
                    handoff = f" | {floor:>14.0f} {floor / b.requests_per_s:>5.2f}"
                print(
                    f"{endpoint:<11} {texts:>5} {conns:>5} | {a.requests_per_s:>10.0f} "
                    f"{a.requests_per_s * texts:>8.0f} {a.p50_ms:>7.2f} {a.p99_ms:>7.2f} | "
                    f"{b.requests_per_s:>9.0f} {b.requests_per_s * texts:>8.0f} {b.p50_ms:>7.2f} "
                    f"{b.p99_ms:>7.2f} | {a.requests_per_s / b.requests_per_s:>5.2f}{handoff}  {rounds}"
                    + (f"  ERRORS {errors}" if errors else "")
                )
    return None


if __name__ == "__main__":
    main()
