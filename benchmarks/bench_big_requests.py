"""Big requests next to small ones: the small one's latency, and memory after the burst.

    .venv/bin/python -m benchmarks.bench_big_requests [--big 4] [--docs 500] [--chars 20000]

A server (``python -m reranker``, BACKEND=torch, default settings) on the embedded model:
1. a tiny /rerank (1 query, 2 short documents) alone: median latency of 10;
2. ``--big`` /rerank requests of ``--docs`` documents x ``--chars`` characters (10 MB each by
   default) at once, while the tiny request is sent again and again: its latencies, and each big
   request's status and duration;
3. RSS (from /metrics) before the burst, at its peak, and once the server is idle again.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import httpx

from benchmarks.common import load_passages_and_queries, server_process

TINY = {"query": "how long does a broken bone take to heal", "documents": ["Bones heal in weeks.", "Paris."]}


def rss_mib(client: httpx.Client) -> float:
    return client.get("/metrics").json()["rss_bytes"] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big", type=int, default=4)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--chars", type=int, default=20_000)
    args = parser.parse_args()
    passages, _ = load_passages_and_queries()
    rng = random.Random(0)

    def document() -> str:
        text = ""
        while len(text) < args.chars:
            text += rng.choice(passages) + " "
        return text[: args.chars]

    big = {"query": "what is the population of berlin", "documents": [document() for _ in range(args.docs)]}
    size_mb = len(httpx.Request("POST", "http://x", json=big).content) / 1e6
    env = {"BACKEND": "torch", "LOG_LEVEL": "warning", "MAX_REQUEST_BYTES": str(64 * 2**20)}
    with server_process(env) as (url, _), httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(3):
            client.post("/rerank", json=TINY)
        alone = []
        for _ in range(10):
            started = time.perf_counter()
            assert client.post("/rerank", json=TINY).status_code == 200
            alone.append((time.perf_counter() - started) * 1000)
        before = rss_mib(client)

        results: list[tuple[int, float]] = []
        peak = [before]

        def send_big() -> None:
            started = time.perf_counter()
            with httpx.Client(base_url=url, timeout=600) as own:
                status = own.post("/rerank", json=big).status_code
            results.append((status, time.perf_counter() - started))

        threads = [threading.Thread(target=send_big) for _ in range(args.big)]
        for thread in threads:
            thread.start()
        during = []
        while any(thread.is_alive() for thread in threads):
            started = time.perf_counter()
            status = client.post("/rerank", json=TINY).status_code
            during.append(((time.perf_counter() - started) * 1000, status))
            peak.append(rss_mib(client))
            time.sleep(0.5)  # pacing of the probe client, not synchronisation
        for thread in threads:
            thread.join()
        time.sleep(2)  # let the idle trim run
        after = rss_mib(client)

    latencies = [ms for ms, status in during if status == 200]
    alone_ms = statistics.median(alone)
    shape = f"{args.docs} documents x {args.chars} chars ({size_mb:.1f} MB each)"
    print(f"{args.big} big /rerank requests of {shape}")
    print(f"big requests: {sorted(results)} (status, seconds)")
    print(f"tiny /rerank alone: median {alone_ms:.1f} ms")
    if latencies:
        p50, worst = statistics.median(latencies), max(latencies)
        print(
            f"tiny /rerank during the burst: {len(latencies)} sent, median {p50:.1f} ms "
            f"({p50 / alone_ms:.1f}x alone), worst {worst:.1f} ms ({worst / alone_ms:.1f}x); "
            f"other statuses: {[s for _, s in during if s != 200]}"
        )
    print(
        f"RSS: before {before:.0f} MiB, peak {max(peak):.0f} MiB, idle after {after:.0f} MiB "
        f"({(after - before) / before:+.0%} vs before)"
    )


if __name__ == "__main__":
    main()
