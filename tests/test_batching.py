"""Batched extraction in the extractor worker (DELF_WORKER_BATCH, DELF_WORKER_BATCH_WAIT_MS).

In-process: `delf_extractor.batcher.Batcher` with the real extractor: photos handed in by
several threads go through the network together and get the same features as one by
one; a photo that breaks its batch fails alone; a lone photo is not kept waiting;
search photos go first.

Real processes (a private Redis, the gateway, a `--pool threads` extractor started as the
launcher starts it, an indexer; helpers from test_faults): an ingest job is extracted in
batches of several photos (the worker logs each batch), every photo is indexed with the
features the single-photo path gives, a corrupt photo inside a batch fails alone with
its reason, and a kill -9 of the extractor in the middle of a batch loses nothing.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from delf_common import config

sys.path.insert(0, str(Path(__file__).parent))

from photos import SAMPLE_PHOTOS, jpeg, random_crop, sample_photo
from conftest import free_port
from test_faults import Cluster, check_exactly_once, wait_completed

N_PHOTOS = 12
BATCH = 4
SIZES = ((256, 192), (224, 224))  # (w, h): photos of equal size share the network's forward pass


def _photo(i: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(100 + i)
    crop = random_crop(sample_photo(SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)]), rng, 0.6, 0.95)
    return cv2.resize(crop, SIZES[i % 2], interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes]]:
    return [(f"b{i:02d}", jpeg(_photo(i), quality=90)) for i in range(N_PHOTOS)]


@pytest.fixture(scope="module")
def extractor():
    from delf_extractor.extract import DelfExtractor

    return DelfExtractor(device="cpu")


def assert_same_features(batched, single, what: str) -> None:
    """Same keypoints (location, scale) and, for each, descriptors with cosine >= 0.99."""
    assert len(batched) == len(single) > 0, what

    def keyed(f):
        return {(round(float(x), 1), round(float(y), 1), round(float(s), 3)): d
                for (x, y), s, d in zip(f.locations, f.scales, f.descriptors)}

    a, b = keyed(batched), keyed(single)
    assert len(a) == len(batched) and len(b) == len(single), f"{what}: duplicate keypoints"
    common = a.keys() & b.keys()
    # Scores tied at the max_features cut-off may swap a keypoint or two; nothing more.
    assert len(common) >= 0.99 * len(single), f"{what}: {len(common)} of {len(single)} keypoints shared"
    cos = np.array([float(np.dot(a[k], b[k]) / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in common])
    assert cos.min() >= 0.99, f"{what}: descriptor cosine down to {cos.min():.4f}"


# --------------------------------------------------------------------------- in-process


def _run_threads(batcher, images, urgent=False):
    """Each image handed in by its own thread, as the worker's tasks do."""
    start = threading.Barrier(len(images))

    def one(rgb):
        with batcher.slot() as slot:
            start.wait()  # all announced before any is submitted: they can share a batch
            return batcher.submit(rgb, urgent=urgent, slot=slot)

    with ThreadPoolExecutor(len(images)) as pool:
        futures = [pool.submit(one, rgb) for rgb in images]
        return [f.result(timeout=300) for f in futures]


def test_batched_features_match_one_by_one(extractor):
    from delf_extractor.batcher import Batcher

    images = [_photo(i) for i in range(2 * BATCH)]
    batcher = Batcher(extractor.extract_batch, BATCH, wait_s=3600)
    batched = _run_threads(batcher, images)
    assert batcher.sizes == {BATCH: 2}, batcher.sizes  # two full batches, nothing alone
    for i, (rgb, feats) in enumerate(zip(images, batched)):
        assert feats.image_size == (rgb.shape[1], rgb.shape[0])
        assert_same_features(feats, extractor.extract(rgb), f"photo {i}")


def test_searches_run_with_the_query_runner(extractor):
    """Urgent photos (searches) go through run_urgent (the worker's: DELF_QUERY_MAX_SCALE
    levels), ingest photos through run (every level)."""
    from delf_extractor.batcher import Batcher

    calls = []

    def run(images):
        calls.append(("ingest", len(images)))
        return extractor.extract_batch(images)

    def run_urgent(images):
        calls.append(("search", len(images)))
        return extractor.extract_batch(images, max_scale=1.0)

    batcher = Batcher(run, BATCH, wait_s=0.01, run_urgent=run_urgent)
    rgb = _photo(0)
    query = batcher.submit(rgb, urgent=True)
    indexed = batcher.submit(rgb)
    assert calls == [("search", 1), ("ingest", 1)]
    assert (1 / query.scales).max() <= 1.0 + 1e-4 < (1 / indexed.scales).max()


def test_a_photo_that_breaks_its_batch_fails_alone(extractor):
    from delf_extractor.batcher import Batcher

    images = [_photo(i) for i in range(BATCH)]
    images[1] = images[1].astype(np.float32)  # extract_batch refuses it, and with it the batch
    batcher = Batcher(extractor.extract_batch, BATCH, wait_s=3600)
    start = threading.Barrier(BATCH)

    def one(rgb):
        with batcher.slot() as slot:
            start.wait()
            try:
                return batcher.submit(rgb, slot=slot)
            except ValueError as exc:
                return exc

    with ThreadPoolExecutor(BATCH) as pool:
        out = list(pool.map(one, images))
    assert isinstance(out[1], ValueError) and "uint8" in str(out[1])
    for i in (0, 2, 3):
        assert_same_features(out[i], extractor.extract(images[i]), f"photo {i}")
    assert batcher.sizes[BATCH] == 1  # the batch was tried once, then one by one


def test_a_lone_photo_is_not_kept_waiting_and_searches_go_first(extractor):
    from delf_extractor.batcher import Batcher

    batcher = Batcher(extractor.extract_batch, BATCH, wait_s=3600)
    # Nothing else is being read: it runs at once, not after wait_s (else: timeout).
    with ThreadPoolExecutor(1) as pool:
        assert len(pool.submit(batcher.submit, _photo(0)).result(timeout=300)) > 0
    assert batcher.sizes == {1: 1}

    # Two ingest photos wait for two more being read; a search photo does not wait for them.
    order = []
    gate = threading.Event()

    def ingest(i):
        with batcher.slot() as slot:
            if i >= 2:
                gate.wait(300)  # these two are still "being read"
            feats = batcher.submit(_photo(i), slot=slot)
            order.append(f"ingest{i}")
            return feats

    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(ingest, i) for i in range(4)]
        deadline = time.monotonic() + 60
        while len(batcher._pending) < 2:  # the first two are queued, waiting for a full batch
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(batcher.submit(_photo(5), urgent=True)) > 0
        order.append("search")
        gate.set()
        for f in pending:
            f.result(timeout=300)
    assert order[0] == "search", order
    assert batcher.sizes == {1: 2, BATCH: 1}, batcher.sizes


# --------------------------------------------------------------------------- real workers


def start_batching_extractor(cluster: Cluster, name: str, metrics_port: int = 0) -> None:
    """An extractor worker as the launcher starts it (threads), batching BATCH photos."""
    from delf_tools.launcher import EXTRACTOR_POOL_ARGS

    cluster.env.update(DELF_WORKER_BATCH=str(BATCH), DELF_WORKER_BATCH_WAIT_MS="2000",
                       DELF_METRICS_PORT=str(metrics_port))
    try:
        cluster._spawn(name, [sys.executable, "-m", "celery", "-A", "delf_extractor.tasks", "worker",
                              "-Q", f"{cluster.prefix}.extract", *EXTRACTOR_POOL_ARGS,
                              "--without-gossip", "--without-mingle", "-n", f"{name}@%h", "--loglevel", "INFO"])
    finally:
        cluster.env.pop("DELF_METRICS_PORT")


BATCH_LINE = re.compile(r"extract batch: (\d+) photos \(\d+ sizes\) (started|done)")


def batches(cluster: Cluster, name: str) -> list[tuple[int, str]]:
    text = (cluster.logs / f"{name}.log").read_text(errors="replace")
    return [(int(m.group(1)), m.group(2)) for m in BATCH_LINE.finditer(text)]


def dispatch_paused(cluster: Cluster, worker: str, items) -> str:
    """Start the job while the extractor is stopped, so its photos wait in the queue together."""
    os.killpg(cluster.procs[worker].pid, signal.SIGSTOP)
    try:
        job_id = cluster.client.start_ingest_job(iter(items)).job_id
    finally:
        os.killpg(cluster.procs[worker].pid, signal.SIGCONT)
    return job_id


def held(log: str) -> set[str]:
    """Ids of the ingest tasks a worker's log shows received and not finished."""
    received = set(re.findall(r"Task delf\.ingest\.extract\[([0-9a-f-]+)\] received", log))
    return received - set(re.findall(r"Task \S+\[([0-9a-f-]+)\] succeeded", log))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def _index_features(cluster: Cluster, monkeypatch, image_ids):
    """Each image's features as stored by the indexer (delf.index.features)."""
    from delf_common.celery_app import make_app
    from delf_common.contract import INDEX_FEATURES, queue_for_task
    from delf_common.features import DelfFeatures

    monkeypatch.setenv("DELF_REDIS_URL", cluster.redis_url)
    monkeypatch.setenv("DELF_QUEUE_PREFIX", cluster.prefix)
    app = make_app()
    out = {}
    for image_id in image_ids:
        r = app.send_task(INDEX_FEATURES, args=(image_id,),
                          queue=queue_for_task(INDEX_FEATURES, cluster.prefix)).get(timeout=60)
        assert r["ok"], r
        out[image_id] = DelfFeatures.from_wire(r["features"])
    return out


def test_ingest_job_is_extracted_in_batches(cluster, photos, extractor, monkeypatch):
    """A job's photos go through the network several at a time; each gets the features the
    single-photo path gives; a corrupt photo among them fails alone, with its reason."""
    from delf_common.images import ImageLimits, decode_image
    from delf_common.proto.delf.v1 import delf_pb2

    cluster.start_redis()
    cluster.start_gateway()
    port = free_port()
    start_batching_extractor(cluster, "ex1", metrics_port=port)
    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ex1", "ix1")

    broken = photos[3][1][: len(photos[3][1]) // 2]  # a valid header, truncated data
    items = [delf_pb2.IngestItem(image_id=i, image=b, metadata={"n": i}) for i, b in photos]
    items.insert(5, delf_pb2.IngestItem(image_id="broken", image=broken))
    job_id = dispatch_paused(cluster, "ex1", items)
    job = wait_completed(cluster, job_id)

    assert (job.total, job.done, job.failed) == (N_PHOTOS + 1, N_PHOTOS, 1), job
    reasons = {e.image_id: e.reason for e in job.errors}
    assert set(reasons) == {"broken"} and "truncated or corrupt" in reasons["broken"], reasons
    formed = [n for n, state in batches(cluster, "ex1") if state == "done"]
    assert formed and max(formed) > 1, f"no batch of several photos:\n{cluster.tail('ex1')}"
    assert max(formed) <= BATCH
    # The same batches, as the worker's Prometheus metrics count them (the lone photos too).
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    count = re.search(r"^delf_extractor_batch_photos_count(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    total = re.search(r"^delf_extractor_batch_photos_sum(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    assert count and total, text[-2000:]
    assert float(total.group(1)) == N_PHOTOS  # every good photo went through exactly one batch
    assert float(count.group(1)) < N_PHOTOS   # in fewer batches than photos

    stored = _index_features(cluster, monkeypatch, [i for i, _ in photos])
    kept = config.get("DELF_STORED_FEATURES")  # the indexer keeps each photo's best-scored ones
    for image_id, data in photos:
        single = extractor.extract(decode_image(data, ImageLimits.from_env())).best(kept)
        assert_same_features(stored[image_id], single, image_id)


def test_kill_9_mid_batch_loses_nothing(cluster, photos):
    """kill -9 the extractor while a batch of several photos is in the network: all of the
    photos it held are redelivered to a new extractor; each is indexed exactly once."""
    from delf_common.proto.delf.v1 import delf_pb2

    cluster.start_redis()
    cluster.start_gateway()
    start_batching_extractor(cluster, "ex1")
    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ex1", "ix1")

    items = [delf_pb2.IngestItem(image_id=i, image=b, metadata={"n": i}) for i, b in photos]
    job_id = dispatch_paused(cluster, "ex1", items)
    # Killed while a batch of several photos is in the network and the worker holds all the
    # photos it may (2 x BATCH received, none finished): its consumer is then not taking a
    # message from Redis. (kombu's Redis transport records a message as unacknowledged just
    # after BRPOP returns it; a worker killed in between loses that one message, batching or
    # not: see test_faults. `delf resume` / DELF_JOB_RESUME_AFTER_S re-send such items.)
    deadline = time.monotonic() + 240
    while True:
        log = (cluster.logs / "ex1.log").read_text(errors="replace")
        in_hand = held(log)
        seen = [(int(m.group(1)), m.group(2)) for m in BATCH_LINE.finditer(log)]
        if len(in_hand) == 2 * BATCH and seen and seen[-1][1] == "started" and seen[-1][0] > 1:
            os.killpg(cluster.procs["ex1"].pid, signal.SIGKILL)
            cluster.procs["ex1"].wait(60)
            break
        assert cluster.procs["ex1"].poll() is None, cluster.tail("ex1")
        assert time.monotonic() < deadline, f"no batch of several photos:\n{cluster.tail('ex1')}"
        time.sleep(0.005)
    assert cluster.job(job_id).done < len(photos)

    start_batching_extractor(cluster, "ex2")
    cluster.wait_workers("ex2")
    wait_completed(cluster, job_id)
    redone = (cluster.logs / "ex2.log").read_text(errors="replace")
    assert all(f"[{task_id}] received" in redone for task_id in in_hand), "photos held by ex1 were lost"
    check_exactly_once(cluster, photos, job_id, "ix1")
