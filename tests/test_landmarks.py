"""Retrieval quality on real landmark photos (../shared/data/landmarks-dev), when present.

Every photo is ingested through the running system; every photo whose group has
another is a query (by its indexed id, which leaves the photo itself out); the
other photos of its group are the right answers. Prints top-1 accuracy per query
and the mAP; skips cleanly where the photos are absent (a fresh clone elsewhere).
"""
from __future__ import annotations

import statistics
import time

import pytest

from delf_common.evaluation import average_precision, queries_and_positives, read_manifest
from delf_common.proto.delf.v1 import delf_pb2
from photos import landmarks_dir

pytestmark = [pytest.mark.slow, pytest.mark.landmarks]

ROOT = landmarks_dir()


@pytest.mark.skipif(ROOT is None, reason="../shared/data/landmarks-dev is not present")
def test_landmarks_dev_top1_and_map(client):
    rows = read_manifest(ROOT / "MANIFEST.tsv")
    group_of = {path.rsplit(".", 1)[0]: group for path, group in rows}
    queries = queries_and_positives(group_of)

    started = time.monotonic()
    job = client.wait_job(client.ingest_folder(ROOT).job_id)
    ingest_s = time.monotonic() - started
    assert job.state == delf_pb2.JOB_STATE_COMPLETED
    assert job.done == len(rows), [(e.image_id, e.reason) for e in job.errors]

    top1, aps, latencies, lines = [], [], [], []
    for image_id, positives in queries.items():
        t = time.monotonic()
        response = client.search(image_id=image_id, top_k=100)
        latencies.append(time.monotonic() - t)
        ranked = [m.image_id for m in response.matches]
        hit = bool(ranked) and ranked[0] in positives
        top1.append(hit)
        aps.append(average_precision(ranked, positives))
        first = response.matches[0] if response.matches else None
        lines.append(f"{'ok ' if hit else 'MISS'} {image_id:<52} -> "
                     f"{first.image_id if first else '-':<52} inliers {first.inliers if first else 0}")

    top1_acc = sum(top1) / len(top1)
    mean_ap = sum(aps) / len(aps)
    print("\n".join(lines))
    print(f"\nlandmarks-dev: {len(rows)} photos, {len(queries)} queries")
    print(f"  top-1 accuracy {top1_acc:.3f}   mAP {mean_ap:.3f}")
    print(f"  ingest {len(rows) / ingest_s:.2f} photos/s   search by id: median {statistics.median(latencies):.2f} s")
    # Floors well below what we measure (see BENCHMARKS.md): they catch a broken pipeline,
    # not a small regression.
    assert top1_acc >= 0.6
    assert mean_ap >= 0.5
