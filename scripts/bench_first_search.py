#!/usr/bin/env python
"""The first search after an ingest against warm searches, through the running system.

Starts the launcher (as `delf up`: embedded Redis, one worker per service, Milvus Lite) in
a temporary folder, then, for each round: ingests a share of landmarks-dev
(../shared/data/landmarks-dev, or --photos) as one bulk job, searches by the id of one of
the photos just ingested as soon as the job completes (the first search: it used to wait
for Milvus Lite's index build of the new rows), then --warm more searches by other ids.
Round 1 ingests the first --first photos into an empty index, round 2 the rest beside them.
Prints a table (seconds of each first search, median of the warm ones, their ratio).

    .venv/bin/python scripts/bench_first_search.py [--photos DIR] [--first 60] [--warm 15] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_system import DEFAULT_PHOTOS, memory_gib, start_system


def ingest(client, photos: list[tuple[str, Path]]) -> float:
    """One job with these photos (as `delf ingest` sends a folder); seconds to completion."""
    from delf_common.proto.delf.v1 import delf_pb2

    items = (delf_pb2.IngestItem(image_id=i, metadata={"path": p.name}, image=p.read_bytes()) for i, p in photos)
    t = time.monotonic()
    job = client.wait_job(client.start_ingest_job(items).job_id)
    if job.failed:
        raise SystemExit(f"{job.failed} photos failed: {list(job.errors)[:3]}")
    return time.monotonic() - t


def timed_search(client, image_id: str) -> float:
    t = time.monotonic()
    client.search(image_id=image_id, top_k=10)
    return time.monotonic() - t


def one_round(client, photos: list[tuple[str, Path]], warm: int) -> dict:
    ingest_s = ingest(client, photos)
    ids = [i for i, _ in photos]
    first = timed_search(client, ids[0])
    warm_s = [timed_search(client, ids[k % len(ids)]) for k in range(1, warm + 1)]
    median = statistics.median(warm_s)
    return {"photos": len(photos), "ingest_s": round(ingest_s, 1), "first_s": round(first, 3),
            "warm_median_s": round(median, 3), "ratio": round(first / median, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="a folder of photos (landmarks-dev)")
    p.add_argument("--first", type=int, default=60, help="photos of round 1 (round 2: the rest)")
    p.add_argument("--warm", type=int, default=15, help="warm searches per round")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not args.photos.is_dir():
        print(f"no folder {args.photos}: nothing to measure (skipped)")
        return 0

    from delf_common.client import DelfClient, photos_in

    photos = photos_in(args.photos)
    rounds = [photos[:args.first], photos[args.first:]]
    results = []
    with tempfile.TemporaryDirectory(prefix="delf-first-search-") as tmp:
        proc, address = start_system(Path(tmp))
        try:
            client = DelfClient(address, timeout=600)
            results = [one_round(client, r, args.warm) for r in rounds if r]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory_gib()} GiB"
    print(f"first search after an ingest, by id ({machine})\n")
    print("| round | photos ingested | ingest s | first search s | warm median s | first / warm |")
    print("|---|---|---|---|---|---|")
    for n, r in enumerate(results, 1):
        print(f"| {n} | {r['photos']} | {r['ingest_s']} | {r['first_s']:.3f} | {r['warm_median_s']:.3f} | "
              f"{r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rounds": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
