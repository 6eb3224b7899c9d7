"""The claim check of the ingest chain (delf_common.parked, issue 14 item 6): an index
message lost with a worker is sent again from Redis, and duplicates are no-ops.

kill -9 of the indexer while kombu's BRPOP hands it a message loses that message (popped
from the queue, never recorded in ``unacked``); tests/test_healing.py hits that by
chance. Here the loss is made by hand, on a private Redis (tests/private_cluster.py): the
extract step's result is parked as ``delf.ingest.extract`` parks it, its index message is
published as the chain does, and then popped off the queue by the test, as the dying
worker's BRPOP does. A real indexer worker indexes the rest; the job then waits, and the
recovery that `delf up` and the gateway's sweep run finishes it, each photo indexed once.
The no-op cases run the index task in process (eager) on the same kind of Redis.
"""
from __future__ import annotations

import base64
import json
import signal
import sys
import time
from pathlib import Path

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from private_cluster import Cluster
from test_index_task_faults import _in_process_indexer, feats

pytestmark = pytest.mark.slow

WAIT_S = 180


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    c = Cluster(tmp_path)
    try:
        _in_process_indexer(c, monkeypatch)
        monkeypatch.delenv("DELF_JOB_STALLED_AFTER_S", raising=False)
        yield c
    finally:
        c.close()


def _job(jobs, sizes: dict[str, int]) -> tuple[str, dict]:
    """A RUNNING job of len(sizes) recorded items, each extracted (parked) with sizes[id]
    features; returns the job id and id -> the index step's payload (the reference)."""
    from delf_common import parked

    job_id = jobs.create()
    for image_id in sizes:
        jobs.record_item(job_id, image_id, {"n": image_id})
    jobs.finish_receiving(job_id)
    refs = {i: parked.park(jobs, job_id, i, {"metadata": {"n": i}, "features": feats(n).to_wire()})
            for i, n in sizes.items()}
    return job_id, refs


def _args_of(message: bytes) -> list:
    """The task arguments in a kombu Redis message (JSON envelope, base64 msgpack body)."""
    envelope = json.loads(message)
    return msgpack.unpackb(base64.b64decode(envelope["body"]), raw=False)[0]


def _until(what, check, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_a_lost_index_message_is_sent_again_and_the_job_completes(cluster):
    from delf_common import parked
    from delf_common.celery_app import make_app, queue_prefix
    from delf_common.contract import INGEST_INDEX, queue_for_task
    from delf_common.jobs import JobStore

    app, jobs, r = make_app(), JobStore(), cluster.redis()
    sizes = {"p0": 40, "p1": 30, "p2": 20, "p3": 10}
    job_id, refs = _job(jobs, sizes)
    queue = queue_for_task(INGEST_INDEX, queue_prefix(app))
    for ref in refs.values():  # what the chain sends once the extract step returned
        app.send_task(INGEST_INDEX, args=(ref, job_id), queue=queue)
    lost = r.rpop(queue)  # the oldest, as a BRPOP hands it to the worker that then dies
    args = _args_of(lost)
    assert args[0] == {"ok": True, "image_id": "p0", "parked": True} and args[1] == job_id, args
    assert len(lost) < 2048  # a claim check: the features stay in Redis, once

    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ix1")
    _until("the 3 messages left", lambda: jobs.get(job_id).done == 3)
    # Lost for good: in neither the queue nor kombu's unacked hash, so no redelivery and no
    # orphan restore can bring it back; the job would wait forever.
    assert r.llen(queue) == 0 and not r.hlen("unacked"), (r.llen(queue), r.hgetall("unacked"))
    status = jobs.get(job_id, explain=True)
    assert (status.state, status.done, status.failed) == ("RUNNING", 3, 0), status
    assert jobs.parked_unfinished(job_id) == ["p0"]

    assert parked.resend_parked_of_jobs(app) == {job_id: 1}  # what `delf up` runs after a death
    status = _until("the job to complete", lambda: (s := jobs.get(job_id)).state == "COMPLETED" and s)
    assert (status.total, status.done, status.failed) == (4, 4, 0), status
    assert not r.exists(jobs.prefix + job_id + ":extracted")  # completed: nothing left parked
    assert parked.resend_parked_of_jobs(app) == {}

    # Late duplicates (a restored copy, a second recovery) are no-ops.
    for ref in (refs["p0"], parked.reference("p0", resent=True)):
        app.send_task(INGEST_INDEX, args=(ref, job_id), queue=queue)
    _until("the duplicates to be taken", lambda: r.llen(queue) == 0 and not r.hlen("unacked"))
    cluster.kill("ix1", signal.SIGTERM)  # warm: finishes what it holds, closes the Lite file
    log = (cluster.logs / "ix1.log").read_text()
    assert log.count("'skipped': 'already recorded'") == 2, cluster.tail("ix1", 80)
    _exactly_once(cluster, sizes)


def _exactly_once(cluster: Cluster, sizes: dict[str, int]) -> None:
    """Read from the Milvus Lite file: the photos, each with its own descriptors, one generation."""
    from delf_indexer.store import DescriptorStore

    store = DescriptorStore(uri=str(cluster.data_dir / "milvus.db"), collection=cluster.collection)
    try:
        assert store.stats()["images"] == len(sizes) and store.stats()["descriptors"] == sum(sizes.values())
        rows = store._query_all(store.features_name, 'image_id != ""', ["image_id", "generation"])
        by_image: dict[str, list] = {}
        for row in rows:
            by_image.setdefault(row["image_id"], []).append(row["generation"])
        assert {i: len(g) for i, g in by_image.items()} == sizes
        assert all(len(set(g)) == 1 for g in by_image.values())
        assert all(store.get(i)["metadata"] == {"n": i} for i in sizes)
    finally:
        store.close()


def test_duplicate_stale_and_old_form_index_messages(cluster):
    """In process (eager): a reference indexes its parked item once; sent again (plain or
    resent) it is a no-op, as is one whose payload is gone; the old inline form still
    indexes (rolling upgrade); a cancelled job's parked item is failed and unparked."""
    from photos import sample_photo

    from delf_common import parked
    from delf_common.images import thumbnail_jpeg
    from delf_common.jobs import JobStore
    from delf_indexer import tasks

    jobs = JobStore()
    tasks.reset_store()
    try:
        store = tasks.get_store()
        job_id, refs = _job(jobs, {"a": 30, "gone": 20, "inline": 10})
        thumb = thumbnail_jpeg(sample_photo("coffee"), 64)
        jobs.park(job_id, "a", {**jobs.parked(job_id, "a"), "thumbnail": thumb})  # as the extractor parks it
        for _ in range(2):
            assert tasks.ingest_index.apply(args=(refs["a"], job_id)).get()["ok"]
        again = tasks.ingest_index.apply(args=(parked.reference("a", resent=True), job_id)).get()
        assert again == {"ok": True, "image_id": "a", "skipped": "already recorded"}, again
        assert store.stats()["images"] == 1 and store.stats()["descriptors"] == 30
        assert jobs.parked(job_id, "a") is None  # recorded: unparked
        assert store.get("a", thumbnail=True)["thumbnail"] == thumb  # the parked thumbnail went with it

        jobs.unpark(job_id, "gone")  # its payload lost (expired): the reference does nothing
        assert tasks.ingest_index.apply(args=(refs["gone"], job_id)).get()["skipped"]
        old = {"ok": True, "image_id": "inline", "metadata": {"n": "inline"}, "features": feats(10).to_wire()}
        assert tasks.ingest_index.apply(args=(old, job_id)).get()["ok"]
        status = jobs.get(job_id)
        assert (status.state, status.done, status.failed) == ("RUNNING", 2, 0), status
        assert store.stats()["images"] == 2 and store.stats()["descriptors"] == 40
        assert jobs.unfinished(job_id).keys() == {"gone"}  # for a resume: extracted again

        cancelled, refs = _job(jobs, {"c": 10})
        jobs.cancel(cancelled)
        assert jobs.parked(cancelled, "c") is None  # a final cancel drops what is parked
        result = tasks.ingest_index.apply(args=(refs["c"], cancelled)).get()
        assert result["error"]["message"] == "job cancelled"
        assert jobs.get(cancelled).errors == [("c", "job cancelled")]
        assert store.stats()["images"] == 2
    finally:
        tasks.reset_store()


def test_recovery_resends_once_per_stall_and_resume_takes_parked_bytes_items(cluster, monkeypatch):
    """The gateway's sweep re-sends a stalled job's parked items once until the job moves;
    ResumeJob re-sends them too, so an extracted bytes item no longer waits for its client;
    the stall hint says which photos wait for an indexer."""
    from delf_common import parked
    from delf_common.celery_app import make_app, queue_prefix
    from delf_common.contract import INGEST_INDEX, queue_for_task
    from delf_common.jobs import JobStore
    from delf_common.proto.delf.v1 import delf_pb2
    from delf_gateway.server import Gateway

    monkeypatch.setenv("DELF_JOB_STALLED_AFTER_S", "0.3")
    app, jobs, r = make_app(), JobStore(), cluster.redis()
    queue = queue_for_task(INGEST_INDEX, queue_prefix(app))
    job_id, _ = _job(jobs, {"x": 10, "y": 10})
    jobs.record_item(job_id, "z", {})  # a bytes item never extracted (its extract message lost)
    jobs.finish_receiving(job_id)
    assert parked.resend_parked_of_jobs(app, jobs, stalled_only=True) == {}  # not stalled yet
    time.sleep(0.4)
    hint = jobs.get(job_id, explain=True).hint
    assert "3 photos not finished: 2 photos extracted, waiting for an indexer" in hint, hint
    assert f"`delf ingest PATH --resume {job_id}`" in hint and "1 of these photos" in hint, hint

    assert parked.resend_parked_of_jobs(app, jobs, stalled_only=True) == {job_id: 2}
    assert parked.resend_parked_of_jobs(app, jobs, stalled_only=True) == {}  # still the same stall
    assert r.llen(queue) == 2
    jobs.mark_done(job_id, "x")  # it moves (as the first re-sent task would), then stalls again
    time.sleep(0.4)
    assert parked.resend_parked_of_jobs(app, jobs, stalled_only=True) == {job_id: 1}

    gateway = Gateway(app=app, jobs=jobs)
    resumed = gateway.ResumeJob(delf_pb2.GetJobRequest(job_id=job_id), None)
    assert (resumed.resent, resumed.awaiting_upload) == (1, 1), resumed
    assert sorted(_args_of(m)[0]["image_id"] for m in r.lrange(queue, 0, -1)) == ["x", "y", "y", "y"]
