"""Fault tolerance of the index task, in process: what the kills of tests/test_faults.py
can only hit by chance, pinned down with eager tasks on a private Redis (the same
tests/private_cluster.py redis-server) and a Milvus Lite file:

* a redelivered index task removes the orphan rows of an add that died midway;
* transient Redis errors are retried with backoff, while bad input is not.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from private_cluster import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


_rng = np.random.default_rng(1)


def feats(n):
    """Synthetic features (unit 40-d descriptors) for in-process indexer tests."""
    from delf_common.features import DelfFeatures

    d = _rng.normal(size=(n, 40)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return DelfFeatures(locations=_rng.uniform(0, 100, (n, 2)).astype(np.float32),
                        scales=np.ones(n, np.float32), scores=np.ones(n, np.float32),
                        descriptors=d, image_size=(100, 100), model="test", pca_id="pca-test")


def _in_process_indexer(cluster, monkeypatch) -> None:
    """The indexer's tasks run here (eagerly), on the cluster's Redis and a Lite file of its own."""
    cluster.start_redis()
    for k, v in {"DELF_REDIS_URL": cluster.redis_url, "DELF_QUEUE_PREFIX": cluster.prefix,
                 "DELF_DATA_DIR": str(cluster.data_dir), "DELF_COLLECTION": cluster.collection,
                 "DELF_MILVUS_URI": ""}.items():
        monkeypatch.setenv(k, v)


def test_redelivered_index_task_removes_orphans_of_a_died_add(cluster, monkeypatch):
    """An indexer killed after inserting a new image's descriptors and before writing its
    images row leaves orphan rows; the redelivered (or retried) task must remove them,
    else the index keeps them forever (stats count them; a later add of the id does not
    replace them, as no images row names their generation). Deterministic: the orphan
    state is made by hand, the task runs in-process (eager) as a retry."""
    _in_process_indexer(cluster, monkeypatch)
    from delf_common.jobs import JobStore
    from delf_indexer import tasks

    tasks.reset_store()
    try:
        store = tasks.get_store()
        store.add("other", feats(30))
        store.add("victim", feats(50))  # the add that "died": rows in, images row ...
        store.client.delete(store.images_name, filter='image_id == "victim"')  # ... never written
        assert store.stats() == {"images": 1, "descriptors": 80, "pca_id": "pca-test"}

        jobs = JobStore()
        job_id = jobs.create()
        jobs.set_total(job_id, 1)
        extracted = {"ok": True, "image_id": "victim", "metadata": {}, "features": feats(40).to_wire()}
        result = tasks.ingest_index.apply(args=(extracted, job_id), retries=1).get()
        assert result["ok"], result
        assert jobs.get(job_id).done == 1
        assert store.stats() == {"images": 2, "descriptors": 70, "pca_id": "pca-test"}

        # Called directly (no worker, no request): a first delivery, no orphan sweep.
        job2 = jobs.create()
        direct = {"ok": True, "image_id": "direct", "metadata": {}, "features": feats(10).to_wire()}
        assert tasks.ingest_index(direct, job2)["ok"]
        assert jobs.get(job2).done == 1
    finally:
        tasks.reset_store()


def test_index_task_retries_transient_redis_errors_not_bad_input(cluster, monkeypatch):
    """The job store (Redis) failing for a moment makes delf.ingest.index retry with backoff
    and the item completes once; bad input is answered at once, never retried."""
    _in_process_indexer(cluster, monkeypatch)
    import redis as redis_lib

    from delf_common import jobs as jobs_mod
    from delf_indexer import tasks

    real_mark_done = jobs_mod.JobStore.mark_done
    calls = {"mark_done": 0, "retry": 0}

    def flaky_mark_done(self, job_id, item_id, **outcome):
        calls["mark_done"] += 1
        if calls["mark_done"] == 1:
            raise redis_lib.ConnectionError("Redis is restarting")
        return real_mark_done(self, job_id, item_id, **outcome)

    real_retry = tasks.ingest_index.retry

    def counting_retry(*args, **kwargs):
        calls["retry"] += 1
        return real_retry(*args, **kwargs)

    monkeypatch.setattr(jobs_mod.JobStore, "mark_done", flaky_mark_done)
    monkeypatch.setattr(tasks.ingest_index, "retry", counting_retry)
    tasks.reset_store()
    try:
        jobs = jobs_mod.JobStore()
        job_id = jobs.create()
        jobs.set_total(job_id, 2)
        good = {"ok": True, "image_id": "good", "metadata": {}, "features": feats(20).to_wire()}
        result = tasks.ingest_index.apply(args=(good, job_id)).get()
        assert result["ok"], result
        assert calls == {"mark_done": 2, "retry": 1}
        assert tasks.get_store().stats()["descriptors"] == 20  # indexed twice, stored once

        bad = {"ok": True, "image_id": "bad", "metadata": {}, "features": {"v": 1, "n": "x"}}
        result = tasks.ingest_index.apply(args=(bad, job_id)).get()
        assert not result["ok"] and result["error"]["code"] == "INVALID_ARGUMENT"
        assert calls["retry"] == 1
        status = jobs.get(job_id)
        assert (status.state, status.done, status.failed) == ("COMPLETED", 1, 1)
    finally:
        tasks.reset_store()
