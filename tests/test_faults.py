"""Fault tolerance of bulk ingestion, with real processes.

Each test starts its own Redis (a private redis-server with an append-only file in
tmp_path, so no other test or deployment sees its short visibility timeout), the
gateway and individually controlled Celery workers, streams one ingest job of small
real photos, breaks something in the middle of it, and checks that the job still
completes with every photo indexed exactly once:

* kill -9 an extractor, then an indexer (redelivery after DELF_VISIBILITY_TIMEOUT_S);
* restart Redis (SIGTERM: it writes its AOF; then the same port and folder);
* warm shutdown (SIGTERM) and restart of the indexer;
* kill -9 of the gateway and a new one (job state lives in Redis).

"Exactly once": the job reports N done and 0 failed, the index holds N images, the
total descriptor count equals the sum of their num_features, and, read straight
from the Milvus Lite file once the indexer has stopped, every image has exactly
num_features descriptor rows, all of its current generation (no orphans).

The private system (Redis, gateway, workers as processes) and the exactly-once checks
are in tests/private_cluster.py; two in-process tests of the index task's recovery
(orphan rows, transient Redis errors) are in tests/test_index_task_faults.py.

kill -9 is sent once the worker has logged the task "received": kombu's Redis
transport takes a message with BRPOP and records it as unacknowledged just after,
so a worker killed between the two loses that message (a kombu limitation; a
SIGSTOP before the kill widened the window enough to lose an item in a first
version of this test).
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from photos import SAMPLE_PHOTOS, jpeg, random_crop, sample_photo
from private_cluster import Cluster, _pb, check_exactly_once, wait_completed

pytestmark = pytest.mark.slow

N_PHOTOS = 100


# --------------------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes]]:
    """N small, distinct JPEGs: crops of the sample photos at several scales."""
    import cv2

    rng = np.random.default_rng(7)
    out = []
    sources = [sample_photo(n) for n in SAMPLE_PHOTOS]
    for i in range(N_PHOTOS):
        crop = random_crop(sources[i % len(sources)], rng, 0.5, 0.9)
        ch, cw = crop.shape[:2]
        side = int(rng.integers(200, 320))
        scale = side / max(ch, cw)
        small = cv2.resize(crop, (max(48, int(cw * scale)), max(48, int(ch * scale))),
                           interpolation=cv2.INTER_AREA)
        out.append((f"p{i:03d}", jpeg(small, quality=88)))
    return out


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------- tests


def test_kill_9_extractor_then_indexer_mid_job(cluster, photos):
    """kill -9 an extractor, later an indexer (caught while it works through a backlog);
    replacements pick up the dead workers' unacknowledged tasks after the visibility
    timeout; every photo ends up indexed exactly once."""
    cluster.start_redis()
    cluster.start_gateway()
    cluster.start_worker("ex1", "extract")
    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ex1", "ix1")

    job_id = cluster.start_job(photos)
    cluster.wait_progress(job_id, 5)
    killed = cluster.kill_mid_task("ex1", "delf.ingest.extract")
    cluster.start_worker("ex2", "extract")
    cluster.wait_workers("ex2")
    cluster.wait_progress(job_id, len(photos) // 2)
    killed_ix = cluster.kill_mid_task("ix1", "delf.ingest.index")
    cluster.start_worker("ix2", "index")
    cluster.wait_workers("ix2")
    assert cluster.job(job_id).state != _pb().JOB_STATE_COMPLETED

    wait_completed(cluster, job_id)
    # The killed tasks ran again on the new workers (redelivered after the visibility timeout).
    # A task killed after its item was recorded but before its log line could be written
    # leaves the job complete without it, so its redelivery may come after completion:
    # wait for it, then check that it doubled nothing.
    wait_in_log(cluster, "ex2", killed)
    wait_in_log(cluster, "ix2", killed_ix)
    check_exactly_once(cluster, photos, job_id, "ix2")


def wait_in_log(cluster, name: str, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in (cluster.logs / f"{name}.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text} never ran on {name}:\n{cluster.tail(name)}"
        time.sleep(0.5)


def test_redis_restart_mid_job(cluster, photos):
    """SIGTERM Redis (it writes its append-only file) mid-job, start it again on the same
    port and folder: the gateway answers GetJob again, workers reconnect, the job completes."""
    cluster.start_redis()
    cluster.start_gateway()
    cluster.start_worker("ex1", "extract")
    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ex1", "ix1")

    job_id = cluster.start_job(photos)
    cluster.wait_progress(job_id, 10)
    cluster.stop_redis(signal.SIGTERM)
    with pytest.raises(grpc.RpcError) as err:
        cluster.job(job_id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    time.sleep(3)
    cluster.start_redis()
    before = cluster.job(job_id)  # the gateway serves again at once
    assert before.total == len(photos)

    wait_completed(cluster, job_id)
    for name in ("ex1", "ix1"):
        assert cluster.procs[name].poll() is None, f"{name} died:\n{cluster.tail(name)}"
        # Rode out the outage (publish retries, job-store retries) rather than failing
        # tasks and relying on redelivery, which takes DELF_VISIBILITY_TIMEOUT_S (1 h).
        log = (cluster.logs / f"{name}.log").read_text()
        assert "raised unexpected" not in log and "Giving up" not in log, cluster.tail(name, 80)
    check_exactly_once(cluster, photos, job_id, "ix1")


def test_indexer_warm_restart_mid_job(cluster, photos):
    """SIGTERM (warm shutdown) the indexer mid-job and start another on the same Milvus
    Lite file: nothing is lost or doubled."""
    cluster.start_redis()
    cluster.start_gateway()
    cluster.start_worker("ex1", "extract")
    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ex1", "ix1")

    job_id = cluster.start_job(photos)
    cluster.wait_progress(job_id, 12)
    in_flight = cluster.kill_mid_task("ix1", "delf.ingest.index", sig=signal.SIGTERM)
    assert cluster.procs["ix1"].returncode == 0, cluster.tail("ix1")
    log = (cluster.logs / "ix1.log").read_text()
    assert f"[{in_flight}] succeeded" in log, "warm shutdown must finish the task in hand"
    assert "MilvusLite server stopped" in log, "warm shutdown must close the Milvus Lite file"
    progress = cluster.job(job_id)
    assert progress.done < len(photos)
    cluster.start_worker("ix2", "index")
    cluster.wait_workers("ix2")

    wait_completed(cluster, job_id)
    check_exactly_once(cluster, photos, job_id, "ix2")


def test_gateway_kill_9_mid_job(cluster, photos):
    """kill -9 the gateway while a streamed job runs, start another: the new gateway answers
    for the job (its state lives in Redis, not in the gateway) and the job completes with
    every photo indexed exactly once."""
    cluster.start_redis()
    cluster.start_gateway()
    cluster.start_worker("ex1", "extract")
    cluster.start_worker("ix1", "index")
    cluster.wait_workers("ex1", "ix1")

    job_id = cluster.start_job(photos)
    before = cluster.wait_progress(job_id, 5)
    assert before.state == _pb().JOB_STATE_RUNNING and before.total == len(photos)
    cluster.client.close()
    cluster.kill("gateway")
    cluster.start_gateway()
    after = cluster.job(job_id)
    assert after.job_id == job_id and after.total == len(photos) and after.done >= before.done

    wait_completed(cluster, job_id)
    check_exactly_once(cluster, photos, job_id, "ix1")

