#!/usr/bin/env python
"""What one ListImages page costs against the index size (issue 22 item 3).

Milvus returns a query's rows in no order, so each page of ``delf.index.list``
(``delf_indexer.listing.list_images``) reads every id after its token and keeps the
smallest: a page costs a scan of the ids that follow it. For each size, a fresh Milvus
Lite index is filled through the store's bulk path (``add_many``, 3 descriptors a photo:
the listing reads the images collection only), then timed: the first page of 100 (the
default), a page of 1000 from the middle, and a whole walk in pages of 1000, in-process
(no gRPC hop, no Celery: add a few ms a page for those).

    .venv/bin/python scripts/bench_listing.py [--sizes 10000,50000] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def fill(store, n: int, rng: np.random.Generator) -> list[str]:
    from delf_common.features import DelfFeatures

    ids = [f"img-{k:07d}" for k in rng.permutation(n)]

    def features() -> DelfFeatures:
        d = rng.standard_normal((3, 16)).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return DelfFeatures(rng.random((3, 2), dtype=np.float32) * 60, np.ones(3, np.float32),
                            np.ones(3, np.float32), d, (64, 64), "bench", "bench-pca")

    for start in range(0, n, 1000):
        store.add_many([(i, features(), {"k": i[-1]}) for i in ids[start:start + 1000]])
    store.settle()
    return sorted(ids)


def measure(n: int, work: Path) -> dict:
    from delf_indexer.listing import list_images
    from delf_indexer.store import DescriptorStore

    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        with DescriptorStore(str(folder / "milvus.db"), collection="bench") as store:
            t = time.perf_counter()
            ids = fill(store, n, np.random.default_rng(n))
            filled = time.perf_counter() - t
            t = time.perf_counter()
            first, _ = list_images(store, "", 100)
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            middle, _ = list_images(store, ids[n // 2], 1000)
            middle_s = time.perf_counter() - t
            t, seen, after, pages = time.perf_counter(), 0, "", 0
            while True:
                page, after = list_images(store, after, 1000)
                seen, pages = seen + len(page), pages + 1
                if not after:
                    break
            walk_s = time.perf_counter() - t
        assert seen == n and len(first) == 100 and len(middle) == min(1000, n - n // 2 - 1)
        return {"images": n, "fill_s": round(filled, 1), "first_page_100_s": round(first_s, 3),
                "middle_page_1000_s": round(middle_s, 3), "walk_pages": pages, "walk_s": round(walk_s, 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,50000", help="index sizes in photos, comma-separated")
    p.add_argument("--work", default=None, help="folder for the temporary indexes (default: the system's temp)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    rows = [measure(int(n), work) for n in args.sizes.split(",")]
    print("| photos | first page of 100 (s) | a middle page of 1000 (s) | whole walk, pages of 1000 (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['first_page_100_s']:.3f} | {r['middle_page_1000_s']:.3f} | "
              f"{r['walk_s']:.1f} ({r['walk_pages']} pages) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
