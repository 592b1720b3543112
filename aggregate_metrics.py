#!/usr/bin/env python3
"""aggregate_metrics.py [--json] [--host H] [--api-key K] PORT|URL ...: cluster totals from every /metrics.

Counters (requests, successes, rejections, failures by reason, items) are summed.
Latency percentiles are NOT averaged (the mean of p95s is not a p95): each instance
exports a histogram of its request latencies with the same fixed buckets; the
histograms are summed and the cluster p50/p95/p99 read off the merged one, with
linear interpolation inside the bucket that holds the rank. That makes them exact
to the bucket width (e.g. a p95 of 412 ms lies between 400 and 500 ms) and never
biased towards the quiet instances. The slowest single instance's own p95 (from its
recent window) is printed beside them.

When the instances protect /metrics (PROTECT_METRICS=true with API_KEYS), pass a key
with --api-key or RERANKER_API_KEY; an instance that refuses the key (401) is reported
as unauthorized, not as unreachable.

Exit code 0 when every instance answered, 1 when some did not (totals then cover
the instances that answered), 2 on bad arguments. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

PERCENTILES = (50, 95, 99)


def metrics_url(target: str, host: str) -> str:
    if target.isdigit():
        return f"http://{host}:{target}/metrics"
    base = target if "://" in target else f"http://{target}"
    return base.rstrip("/") + ("" if base.rstrip("/").endswith("/metrics") else "/metrics")


class Unanswered(NamedTuple):
    """Why an instance's metrics are missing: nothing answered, or it refused the request."""

    reachable: bool
    reason: str


def fetch(url: str, timeout_s: float, api_key: str = "") -> dict[str, Any] | Unanswered:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        ) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            what = "the API key was refused" if api_key else "/metrics needs an API key"
            return Unanswered(True, f"unauthorized (401): {what}; pass --api-key KEY or set RERANKER_API_KEY")
        return Unanswered(True, f"HTTP {exc.code} from {url}")
    except ValueError:
        return Unanswered(True, f"{url} did not answer JSON")
    except (OSError, urllib.error.URLError) as exc:
        return Unanswered(False, f"unreachable: {getattr(exc, 'reason', exc)}")


def histogram_percentile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-th percentile of a bucketed distribution (``counts`` has one overflow bucket more)."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q / 100.0 * total
    cumulative = 0
    for index, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if index == len(bounds):  # slower than the last bound: all we know is the lower edge
                return float(bounds[-1])
            lower = float(bounds[index - 1]) if index else 0.0
            return lower + (float(bounds[index]) - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])


def aggregate(snapshots: dict[str, dict[str, Any] | Unanswered | None]) -> dict[str, Any]:
    """Cluster totals; a snapshot is an instance's /metrics, or why it is missing (None:
    unreachable)."""
    answered = {url: snap for url, snap in snapshots.items() if isinstance(snap, dict)}
    totals: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    merged_counts: list[int] = []
    bounds: list[float] = []
    instances = []
    by_model: dict[str, Counter[str]] = {}
    for url, snap in snapshots.items():
        if not isinstance(snap, dict):
            missing = snap or Unanswered(False, "unreachable")
            instances.append(
                {"url": url, "reachable": missing.reachable, "answered": False, "error": missing.reason}
            )
            continue
        for key in (
            "total_requests", "successful_requests", "rejected_requests", "items_processed",
            "client_errors", "server_errors",
        ):  # fmt: skip
            totals[key] += int(snap.get(key, 0))
        failures.update(snap.get("failed_requests", {}))
        models = snap.get("models") or ({snap["model"]: snap} if snap.get("model") else {})
        for name, own in models.items():
            counts = by_model.setdefault(name, Counter())
            for key in ("total_requests", "successful_requests", "items_processed"):
                counts[key] += int(own.get(key, 0))
            counts["instances"] += 1
        histogram = snap.get("latency_histogram_ms") or {}
        if histogram:
            if not bounds:
                bounds, merged_counts = list(histogram["le"]), [0] * len(histogram["counts"])
            if list(histogram["le"]) != bounds:
                raise SystemExit(f"{url}: latency buckets differ from the other instances; cannot merge")
            merged_counts = [a + b for a, b in zip(merged_counts, histogram["counts"], strict=True)]
        instances.append(
            {
                "url": url,
                "reachable": True,
                "answered": True,
                "status": snap.get("status"),
                "total_requests": snap.get("total_requests", 0),
                "success_rate": snap.get("success_rate"),
                "rejected_requests": snap.get("rejected_requests", 0),
                "p95_ms": (snap.get("latency_ms") or {}).get("p95"),
            }
        )
    served = totals["successful_requests"] + totals["server_errors"]
    latency = {
        f"p{q}": (round(v, 1) if (v := histogram_percentile(bounds, merged_counts, q)) is not None else None)
        for q in PERCENTILES
    }
    p95s = [row["p95_ms"] for row in instances if row.get("p95_ms") is not None]
    return {
        "instances": instances,
        "cluster": {
            "instances_answering": len(answered),
            "instances_total": len(snapshots),
            **{key: totals[key] for key in ("total_requests", "successful_requests", "rejected_requests")},
            "failed_requests": dict(failures),
            "client_errors": totals["client_errors"],
            "server_errors": totals["server_errors"],
            # Served among what the servers could serve: clients' 4xx stay out (as each instance counts).
            "success_rate": round(totals["successful_requests"] / served, 6) if served else 1.0,
            "items_processed": totals["items_processed"],
            "latency_ms": latency,
            "latency_method": "merged fixed-bucket histograms, linear interpolation within a bucket",
            "slowest_instance_p95_ms": max(p95s) if p95s else None,
        },
        "models": {name: dict(counts) for name, counts in sorted(by_model.items())},
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{'INSTANCE':<32} {'STATUS':<10} {'REQUESTS':>9} {'SUCCESS':>8} {'REJECTED':>8} {'P95 MS':>8}"]
    for row in report["instances"]:
        if not row["answered"]:
            lines.append(f"{row['url']:<32} {row['error']}")
            continue
        lines.append(
            f"{row['url']:<32} {row['status'] or '-':<10} {row['total_requests']:>9} "
            f"{row['success_rate']:>8.2%} {row['rejected_requests']:>8} {row['p95_ms'] or '-':>8}"
        )
    c = report["cluster"]
    latency = c["latency_ms"]
    lines += [
        "",
        f"cluster: {c['instances_answering']}/{c['instances_total']} instances answering",
        f"  requests {c['total_requests']}, successful {c['successful_requests']} "
        f"({c['success_rate']:.2%} of what could be served), rejected (503) {c['rejected_requests']}, "
        f"client errors (4xx) {c['client_errors']}, server errors (5xx) {c['server_errors']}, "
        f"failed {c['failed_requests'] or 0}",
        f"  items processed {c['items_processed']}",
        f"  latency ms p50 {latency['p50']}  p95 {latency['p95']}  p99 {latency['p99']}"
        f"  (from merged histograms; slowest instance's own p95 {c['slowest_instance_p95_ms']})",
    ]
    for name, counts in report.get("models", {}).items():
        lines.append(
            f"  model {name}: {counts['total_requests']} requests, {counts['items_processed']} items "
            f"on {counts['instances']} instance(s)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="ports (on --host) or base URLs of instances")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument(
        "--api-key", default=None, help="Bearer key for protected /metrics (default: $RERANKER_API_KEY)"
    )
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    api_key = args.api_key if args.api_key is not None else environ.get("RERANKER_API_KEY", "")
    urls = [metrics_url(target, args.host) for target in args.targets]
    report = aggregate({url: fetch(url, args.timeout, api_key) for url in urls})
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["cluster"]["instances_answering"] == len(urls) else 1


if __name__ == "__main__":
    sys.exit(main())
