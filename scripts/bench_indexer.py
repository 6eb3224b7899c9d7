#!/usr/bin/env python
"""The indexer's insert rate: descriptor rows (and photos) per second through the store.

Synthetic photos of ``--stored`` descriptors each (unit vectors of the shipped PCA's
dimension) are indexed through ``DescriptorStore.add`` (one photo per call: the path of
AddImage and of each ingest item today) and through ``DescriptorStore.add_many`` (the bulk
path: ``--batch`` photos per call), on a fresh Milvus Lite file (the embedded default) or,
with ``--backend server``, a fresh Milvus server from the PyPI ``milvus`` package, where
``--workers`` processes index in parallel into the same collection (a Lite file has one
writer: the indexer runs as one process there). Each run ends with the rows searchable
(Lite: flushed and indexed), which is counted in its time.

    .venv/bin/python scripts/bench_indexer.py [--photos 2000] [--stored 300] [--batch 100]
        [--backend lite|server] [--workers 1,2] [--direct 1,0] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def photo(rng, n: int, dim: int):
    from delf_common.features import DelfFeatures

    d = rng.standard_normal((n, dim)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return DelfFeatures(rng.uniform(0, 1000, (n, 2)), rng.uniform(0.25, 1.4, n),
                        np.sort(rng.random(n))[::-1].copy(), d, (1024, 768), model="bench", pca_id="bench")


def index_photos(uri: str, first: int, count: int, args, path: str) -> tuple[float, float]:
    """Index photos first..first+count-1 through `path` ("add" or "add_many"); (seconds to
    write them, seconds until they are searchable)."""
    from delf_indexer.store import DescriptorStore

    rng = np.random.default_rng(first)
    store = DescriptorStore(uri, token="root:Milvus" if uri.startswith("http") else "", collection="bench")
    try:
        store.add(f"warm-{first}", photo(rng, args.stored, args.dim), {})  # creates the collection
        items = [(f"p{first + k:08d}", photo(rng, args.stored, args.dim), {"kind": "bench"})
                 for k in range(count)]
        t = time.monotonic()
        if path == "add":
            for item in items:
                store.add(*item)
        else:
            for start in range(0, count, args.batch):
                store.add_many(items[start:start + args.batch])
        written = time.monotonic() - t
        store.settle()
        return written, time.monotonic() - t
    finally:
        store.close()


def _worker(job):
    uri, first, count, args, path = job
    return index_photos(uri, first, count, args, path)


def run(args, path: str, workers: int, uri_for, direct: str) -> dict:
    os.environ["DELF_LITE_DIRECT_INSERT"] = direct
    with tempfile.TemporaryDirectory(prefix="delf-bench-indexer-") as tmp:
        uri, stop = uri_for(Path(tmp))
        try:
            share = args.photos // workers
            jobs = [(uri, 10_000_000 * (w + 1), share, args, path) for w in range(workers)]
            t = time.monotonic()
            if workers == 1:
                seconds = [_worker(jobs[0])]
            else:
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    seconds = pool.map(_worker, jobs)
            wall = time.monotonic() - t
        finally:
            stop()
    rows = share * workers * args.stored
    written, searchable = max(s[0] for s in seconds), max(s[1] for s in seconds)
    return {"backend": args.backend, "path": path, "direct_insert": args.backend == "lite" and direct == "1",
            "workers": workers, "photos": share * workers, "stored_per_photo": args.stored, "rows": rows,
            "rows_per_s": rows / searchable, "photos_per_s": share * workers / searchable,
            "write_rows_per_s": rows / written, "wall_s": wall}


def lite_uri(tmp: Path):
    return str(tmp / "bench.db"), lambda: None


def server_uri(tmp: Path):
    from milvus import MilvusServer

    server = MilvusServer()
    server.set_base_dir(str(tmp / "milvus"))
    server.start()
    return f"http://127.0.0.1:{server.listen_port}", server.stop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=2000)
    p.add_argument("--stored", type=int, default=300, help="descriptors per photo")
    p.add_argument("--dim", type=int, default=96, help="descriptor dimension (the shipped PCA: 96)")
    p.add_argument("--batch", type=int, default=100, help="photos per add_many call")
    p.add_argument("--backend", choices=("lite", "server"), default="lite")
    p.add_argument("--workers", default="1", help="server: parallel indexer processes, comma-separated")
    p.add_argument("--paths", default="add,add_many")
    p.add_argument("--direct", default="1,0",
                   help="Lite: DELF_LITE_DIRECT_INSERT values to compare (1: columns into Lite, 0: its API)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ["DELF_STORED_FEATURES"] = "0"  # the photos are drawn with --stored descriptors
    uri_for = server_uri if args.backend == "server" else lite_uri
    counts = [int(w) for w in args.workers.split(",")] if args.backend == "server" else [1]
    results = []
    print(f"\n{os.cpu_count()} CPU cores; {args.photos} photos of {args.stored} descriptors ({args.dim}-d)")
    print("rows/s: until searchable (Lite: flushed and indexed); written: until the last insert returned")
    print("| backend | path | direct insert | workers | rows/s | photos/s | rows/s written |")
    print("|---|---|---|---|---|---|---|")
    for workers in counts:
        for path in args.paths.split(","):
            for direct in (args.direct.split(",") if args.backend == "lite" else ["0"]):
                r = run(args, path, workers, uri_for, direct)
                results.append(r)
                print(f"| {r['backend']} | {path} | {'yes' if r['direct_insert'] else 'no'} | {workers} | "
                      f"{r['rows_per_s']:,.0f} | {r['photos_per_s']:.1f} | {r['write_rows_per_s']:,.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
