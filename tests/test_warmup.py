"""Issue 14, item 8: the first search after `delf up` says ready is about as fast as the
next ones. Each worker warms up before it answers (extractor: one forward pass; indexer:
its store opened and searched once; verifier: OpenCV's RANSAC run once), so the
launcher's ready line and the gateway's SERVING mean fast.

One `delf up` of the test's own (tests/up_system.py): photos are indexed, the system is
stopped and started again, and the first search by photo bytes right after ready is
timed against the second (a generous factor, no absolute timing: the machine is shared)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from photos import jpeg, landmarks_dir, sample_photo, warped_query
from up_system import UpSystem, small_photos

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)
def test_item8_first_search_after_ready_is_not_much_slower_than_the_second(tmp_path):
    from delf_common.proto.delf.v1 import delf_pb2

    up = UpSystem(tmp_path)
    try:
        up.start()
        photos, queries = _photos_and_queries()
        items = [delf_pb2.IngestItem(image_id=name, image=data) for name, data in photos]
        with up.client() as client:
            job = client.wait_job(client.start_ingest_job(items).job_id)
            assert (job.done, job.failed) == (len(items), 0), job
        assert up.stop() == 0, up.report()

        up.start()  # a fresh start: every process, model and store loaded anew
        times, best = [], []
        with up.client() as client:
            for query in queries:
                began = time.monotonic()
                reply = client.search(query, top_k=3)
                times.append(time.monotonic() - began)
                best.append(bool(reply.matches))
        print(f"\nfirst search after ready {times[0]:.2f} s, second {times[1]:.2f} s")
        assert all(best), "both queries find their place"
        # the stall this guards against was 49x / 22x the warm search (5.8 s against 0.12 s); the
        # margin is for a loaded machine, where a cold first search took 5.2 s against 1.2 s
        assert times[0] < 5 * times[1] + 2.0, (times, up.report())
    finally:
        up.stop()


def _photos_and_queries() -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """Photos to index and two queries of the same places: landmarks-dev photos (full size,
    as users send them) when present, else crops of the sample photos."""
    root = landmarks_dir()
    if root is None:
        photos = small_photos(6) + [("rocket", jpeg(sample_photo("rocket")))]
        return photos, [jpeg(warped_query(sample_photo("rocket"), seed=s)[0]) for s in (3, 4)]
    photos, queries = [], []
    groups = [sorted(f for f in g.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:5]
              for g in sorted(p for p in root.iterdir() if p.is_dir())]
    for files in [files for files in groups if len(files) >= 2][:3]:
        photos += [(f"{f.parent.name}/{f.name}", f.read_bytes()) for f in files[:-1]]
        queries.append(files[-1].read_bytes())
    return photos, queries[:2]
