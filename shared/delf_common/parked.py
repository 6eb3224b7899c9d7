"""The claim check of the ingest chain: an extracted photo waits in Redis, its index message names it.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged
(its ``unacked`` hash) just after. A worker killed in that moment (kill -9, OOM: the
reply written to the socket of a dying process, or read and not yet recorded) loses the
message: it is in neither the queue nor ``unacked``, so neither redelivery nor the
orphan restore of `delf up` can bring it back. For the index step of an ingest job that
message held the photo's features, which existed nowhere else.

So ``delf.ingest.extract`` parks its result in the job (`park`: ``<job>:extracted``,
item id -> msgpack of metadata, features and thumbnail, the job's TTL) and the chain hands
``delf.ingest.index`` a `reference` (``{"ok": True, "image_id", "parked": True}``). The
index step reads the payload, indexes, records the item done or failed, then unparks it.
An item parked and not finished is handed out again from Redis (`resend_parked`): by
`delf up` right after an indexer died (and at start, after a crash of everything), by the
gateway's sweep once a job is stalled (DELF_JOB_STALLED_AFTER_S, once per stall), and by
ResumeJob. A reference whose payload is gone or whose item is finished is a no-op, so
duplicates cost a small message each.

Redis memory: the features (and thumbnail) are stored once, in the hash, as raw msgpack,
where the message used to hold them (base64 in kombu's JSON envelope, a third larger); the hash
field goes when the item is recorded, the whole hash when the job completes or is
cancelled.
"""
from __future__ import annotations

import logging
import time

import redis

from delf_common.celery_app import queue_prefix
from delf_common.contract import INGEST_INDEX, ok, queue_for_task
from delf_common.jobs import RECEIVING, RUNNING, JobStore

log = logging.getLogger(__name__)

# How long an extractor keeps trying to park a result while Redis restarts (as a worker's
# publish does, delf_common.celery_app.WORKER_PUBLISH_RETRY_POLICY): about a minute.
PARK_PATIENCE_S = 60.0


def reference(image_id: str, resent: bool = False) -> dict:
    """The index message's payload for a parked item. `resent`: sent again by a recovery,
    so the index step treats it as a redelivery (it may follow an add that died midway)."""
    ref = ok(image_id=image_id, parked=True)
    if resent:
        ref["resent"] = True
    return ref


def is_reference(extracted) -> bool:
    return isinstance(extracted, dict) and bool(extracted.get("parked"))


def park(jobs: JobStore, job_id: str, image_id: str, extracted: dict,
         patience_s: float = PARK_PATIENCE_S) -> dict:
    """Parks an extracted item (`{"metadata", "features", "thumbnail"?}`) and returns its
    `reference`; rides out a Redis restart."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            jobs.park(job_id, image_id, extracted)
            return reference(image_id)
        except (redis.ConnectionError, redis.TimeoutError):
            if waited >= patience_s:
                raise
            time.sleep(delay)
            waited += delay
            delay = min(delay + 0.5, 3.0)


def resend_parked(app, jobs: JobStore, job_id: str, exclude=frozenset(), prefix: str | None = None) -> list[str]:
    """Sends an index reference again for every parked item of the job that is neither done
    nor failed (and not in `exclude`), to the index queue of DELF_QUEUE_PREFIX `prefix`
    (default: the one `app` was built with); returns their ids."""
    queue = queue_for_task(INGEST_INDEX, queue_prefix(app) if prefix is None else prefix)
    ids = [i for i in jobs.parked_unfinished(job_id) if i not in exclude]
    for image_id in ids:
        app.send_task(INGEST_INDEX, args=(reference(image_id, resent=True), job_id), queue=queue)
    return ids


def resend_parked_of_jobs(app, jobs: JobStore | None = None, stalled_only: bool = False,
                          prefix: str | None = None) -> dict[str, int]:
    """`resend_parked` for every unfinished job (RECEIVING or RUNNING); `stalled_only`: only
    stalled ones (DELF_JOB_STALLED_AFTER_S), each once until it moves again. Returns job id
    -> items re-sent (jobs with none left out)."""
    jobs = jobs or JobStore()
    prefix = queue_prefix(app) if prefix is None else prefix
    out: dict[str, int] = {}
    for job_id in list(jobs.job_ids()):
        status = jobs.get(job_id)
        if status is None or status.state not in (RUNNING, RECEIVING):
            continue
        if stalled_only and not (status.stalled and jobs.first_resend(job_id, repr(status.updated_at))):
            continue
        if n := len(resend_parked(app, jobs, job_id, prefix=prefix)):
            out[job_id] = n
            log.warning("job %s: re-sent the index tasks of %d extracted photo%s not finished", job_id, n,
                        "s" if n != 1 else "")
    return out
