#!/usr/bin/env python
"""Search by upload through the HTTP API (delf_web) against the same search through gRPC.

Against a running system (`delf up`) whose index holds landmarks-dev (115 photos,
`delf ingest ../shared/data/landmarks-dev`): for each of --queries landmarks-dev photos,
--repeats times, the same bytes are searched (top_k 10) through the gateway
(delf_common.client.DelfClient.search) and through the web service (multipart POST
/api/v1/search), alternating which goes first, one call at a time. Prints per path the
median, mean and p95 latency and the difference HTTP - gRPC (the target: within 10 % or
50 ms); checks that both answer the same ranking.

    .venv/bin/python scripts/bench_http.py [--http http://127.0.0.1:8080] [--gateway 127.0.0.1:50051]
        [--photos ../shared/data/landmarks-dev] [--queries 20] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "landmarks-dev"


def query_photos(folder: Path, n: int) -> list[tuple[str, bytes]]:
    """`n` photos spread over the folder's groups (every k-th in sorted order)."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(paths) // max(n, 1))
    return [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in paths[::step][:n]]


def timed(fn) -> tuple[float, list[str]]:
    started = time.perf_counter()
    ids = fn()
    return time.perf_counter() - started, ids


def measure(args) -> dict:
    import requests

    from delf_common.client import DelfClient

    client = DelfClient(args.gateway, token=args.token or None)
    session = requests.Session()
    if args.token:
        session.headers["Authorization"] = f"Bearer {args.token}"
    url = args.http.rstrip("/") + "/api/v1/search"

    def grpc_call(data):
        return lambda: [m.image_id for m in client.search(data, top_k=10).matches]

    def http_call(name, data):
        def call():
            r = session.post(url, files={"photo": (name, data)}, data={"top_k": "10"}, timeout=300)
            r.raise_for_status()
            return [m["image_id"] for m in r.json()["matches"]]
        return call

    times = {"grpc": [], "http": []}
    disagree = 0
    photos = query_photos(Path(args.photos), args.queries)
    timed(grpc_call(photos[0][1]))  # warm both paths
    timed(http_call(*photos[0]))
    for r in range(args.repeats):
        for i, (name, data) in enumerate(photos):
            order = [("grpc", grpc_call(data)), ("http", http_call(name, data))]
            ranks = {}
            for kind, fn in (order if (i + r) % 2 == 0 else order[::-1]):
                elapsed, ranks[kind] = timed(fn)
                times[kind].append(elapsed)
            disagree += ranks["grpc"][:1] != ranks["http"][:1]
    client.close()
    return {"queries": len(photos), "repeats": args.repeats, "times": times, "top1_disagreements": disagree}


def summary(result: dict) -> dict:
    out = {}
    for kind, values in result["times"].items():
        values = sorted(values)
        out[kind] = {"median_s": statistics.median(values), "mean_s": statistics.fmean(values),
                     "p95_s": values[min(len(values) - 1, int(0.95 * len(values)))], "calls": len(values)}
    g, h = out["grpc"]["median_s"], out["http"]["median_s"]
    out["http_minus_grpc_median_s"] = h - g
    out["http_over_grpc_median"] = h / g if g else None
    out["within_target"] = (h - g) <= max(0.10 * g, 0.050)
    out["top1_disagreements"] = result["top1_disagreements"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", default="http://127.0.0.1:8080")
    parser.add_argument("--gateway", default=None, help="default: DELF_GATEWAY")
    parser.add_argument("--token", default="")
    parser.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = summary(measure(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'path':<6} {'calls':>5} {'median s':>9} {'mean s':>8} {'p95 s':>7}")
    for kind in ("grpc", "http"):
        r = result[kind]
        print(f"{kind:<6} {r['calls']:>5} {r['median_s']:>9.3f} {r['mean_s']:>8.3f} {r['p95_s']:>7.3f}")
    print(f"HTTP - gRPC, median: {result['http_minus_grpc_median_s'] * 1000:+.1f} ms "
          f"(x{result['http_over_grpc_median']:.3f}); within 10 % or 50 ms: {result['within_target']}; "
          f"top-1 disagreements: {result['top1_disagreements']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
