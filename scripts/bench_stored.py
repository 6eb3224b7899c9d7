#!/usr/bin/env python
"""mAP against the descriptors stored per photo (and the Milvus Lite index type).

For each stored count N (DELF_STORED_FEATURES: each indexed photo keeps its N best-scored
descriptors) and index type (DELF_MILVUS_INDEX on a Lite file), two fresh Lite indexes are
filled through the store's bulk path: the landmarks-dev photos alone, and the same photos
among ``--distractors`` synthetic photos of N descriptors each (``bench_latency``'s
model of the real descriptors). Every landmarks-dev photo with another photo of its group
is a query with all its descriptors (as a search by photo bytes: queries keep more than
the index), itself excluded; the indexer's search (kNN + votes) and the verifier's RANSAC
rank the photos, as in ``bench_latency``. In-process, no gRPC hops.

    .venv/bin/python scripts/bench_stored.py [--stored 1000,500,300,200] [--index IVF_SQ8,IVF_FLAT]
        [--distractors 1885] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_latency  # noqa: E402 - after the sys.path / environment setup above
from bench_scale import Inputs  # noqa: E402 - after the sys.path / environment setup above


def fill(store, inputs: Inputs, stored: int, distractors: int) -> float:
    """The real photos and `distractors` synthetic ones through add_many; rows per second."""
    items = [(i, f, {"group": g}) for i, (g, _, f) in inputs.real.items()]
    rows, t = 0, time.monotonic()
    for start in range(0, len(items), 100):
        rows += sum(r["num_features"] for r in store.add_many(items[start:start + 100]))
    for start in range(0, distractors, 200):
        batch = [(f"synthetic-{k:07d}", inputs.distractors.photo(stored), {})
                 for k in range(start, min(distractors, start + 200))]
        rows += sum(r["num_features"] for r in store.add_many(batch))
    store.settle()
    return rows / (time.monotonic() - t)


def accuracy(store, inputs: Inputs) -> dict:
    from delf_tools.evaluation import average_precision

    aps, p1, t = [], [], time.monotonic()
    for qid in inputs.map_queries:
        _, _, ranked = bench_latency.search_stages(store, inputs.real[qid][2], exclude=[qid])
        positives = {j for j, g in inputs.groups.items() if j != qid and g == inputs.groups[qid]}
        aps.append(average_precision(ranked[:100], positives))
        p1.append(float(bool(ranked) and ranked[0] in positives))
    return {"map": float(np.mean(aps)), "precision_at_1": float(np.mean(p1)),
            "search_s": (time.monotonic() - t) / len(aps), "queries": len(aps)}


def run(inputs: Inputs, stored: int, index: str, distractors: int) -> dict:
    from delf_indexer.store import DescriptorStore

    os.environ["DELF_STORED_FEATURES"] = str(stored)
    os.environ["DELF_MILVUS_INDEX"] = index
    out = {"stored_per_photo": stored, "index": index, "distractors": distractors}
    for label, n in (("without_distractors", 0), ("with_distractors", distractors)):
        tmp = Path(tempfile.mkdtemp(prefix="delf-bench-stored-"))
        try:
            with DescriptorStore(str(tmp / "milvus.db"), collection="delf") as store:
                rate = fill(store, inputs, stored, n)
                result = accuracy(store, inputs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out[f"map_{label}"] = result["map"]
        out[f"precision_at_1_{label}"] = result["precision_at_1"]
        out[f"search_s_{label}"] = result["search_s"]
        if n:
            out["fill_rows_per_s"] = rate
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stored", default="1000,500,300,200")
    p.add_argument("--index", default="IVF_SQ8")
    p.add_argument("--distractors", type=int, default=1885, help="synthetic photos beside the 115 real ones")
    p.add_argument("--photos", type=Path, default=bench_latency.DEFAULT_PHOTOS)
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-bench-latency"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.queries = 20
    args.cache.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(args)
    results = []
    print(f"\n{os.cpu_count()} CPU cores; {len(inputs.map_queries)} queries; in-process kNN + votes + RANSAC")
    print("| stored per photo | Lite index | mAP alone | mAP among distractors | P@1 among distractors | "
          "search s (among) |")
    print("|---|---|---|---|---|---|")
    for index in args.index.split(","):
        for stored in (int(s) for s in args.stored.split(",")):
            r = run(inputs, stored, index, args.distractors)
            results.append(r)
            print(f"| {stored} | {index} | {r['map_without_distractors']:.3f} | {r['map_with_distractors']:.3f} | "
                  f"{r['precision_at_1_with_distractors']:.3f} | {r['search_s_with_distractors']:.2f} |", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
