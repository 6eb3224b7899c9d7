"""Bulk ingestion jobs: StartIngestJob and the job RPCs around it.

Each streamed item is checked, recorded in the job (delf_common.jobs) before it is sent,
and sent as an extract | index Celery chain; the extract step parks the features in the
job and the index step reads them there (delf_common.parked). A job whose stream broke or
whose messages were lost is resumed: by ResumeJob, by a new stream with `delf-resume-job`,
or by the sweeper (DELF_JOB_RESUME_AFTER_S); the sweeper also re-sends the index tasks of a
stalled job's extracted photos (DELF_JOB_STALLED_AFTER_S). Items already finished are
never redone.

A bytes item whose id already holds the same bytes (sha256) and metadata is done at once,
unextracted (``unchanged``: an unchanged folder ingested again); one whose bytes another
id holds is reported, and with DELF_DUPLICATES=skip done unindexed (delf_indexer.duplicates).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time

import grpc

from delf_common import celery_app
from delf_common import contract, inflight, parked, tracing
from delf_common.jobs import JobStatus
from delf_common.proto.delf.v1 import delf_pb2
from delf_gateway.backpressure import WorkerCalls
from delf_gateway.checks import (RequestError, check_image_id, check_job_id, check_location, check_metadata,
                                 check_photo)

log = logging.getLogger("delf.gateway")

# StartIngestJob metadata naming a job the stream continues (resume).
RESUME_METADATA_KEY = "delf-resume-job"
# Initial metadata of a StartIngestJob answer: the job's id, sent before the stream is read.
JOB_ID_METADATA_KEY = "delf-job-id"
# A RECEIVING job whose last item arrived this recently may still have a live stream.
RESUME_STREAM_IDLE_S = contract.RESUME_STREAM_IDLE_S
# How long an item waits for the indexer's answer on its bytes (unchanged? a duplicate?)
# before it is sent to the workers without one. After one such wait the job's other items
# are sent without asking (an indexer that is away or behind a backlog must not slow a
# stream down by this much per photo); the indexer still reports duplicates as it indexes.
KNOWN_TIMEOUT_S = 3.0
KNOWN_SKIPPED_JOBS_MAX = 1000

_JOB_STATES = {
    "RECEIVING": delf_pb2.JOB_STATE_RECEIVING,
    "RUNNING": delf_pb2.JOB_STATE_RUNNING,
    "COMPLETED": delf_pb2.JOB_STATE_COMPLETED,
    "CANCELLED": delf_pb2.JOB_STATE_CANCELLED,
}


class IngestJobs(WorkerCalls):
    """The job RPCs of the gateway's servicer (StartIngestJob, GetJob, ResumeJob, CancelJob,
    WatchJob) and the stall sweeper."""

    def StartIngestJob(self, request_iterator, context):
        resume_id = resume_job_id(context)
        self._admit("extract")  # before a job exists: a full system takes no new job
        if resume_id:
            job_id = resume_id
            self._check_resumable(self._job(job_id), stream=True)
            self.jobs.reopen(job_id, receiving=True)
        else:
            job_id = self.jobs.create()
        if context is not None:  # the client learns the id at once, even if its stream breaks later
            context.send_initial_metadata(((JOB_ID_METADATA_KEY, job_id),))
        seen: set[str] = set()
        skipped = 0
        try:
            for n, item in enumerate(request_iterator):
                if resume_id and item.image_id and item.image_id not in seen \
                        and self.jobs.is_finished(job_id, item.image_id):
                    seen.add(item.image_id)
                    skipped += 1  # finished before: not checked, not redone
                    continue
                self._dispatch_item(job_id, n, item, seen, context)
            resent, awaiting = self._resend_unfinished(job_id, context, exclude=seen) if resume_id else (0, 0)
        except Exception:
            # The client went away mid-stream: keep what was dispatched, end the job; it
            # may be resumed (ResumeJob, or a stream with `delf-resume-job`).
            self.jobs.finish_receiving(job_id)
            self.jobs.cancel(job_id, interrupted=True)
            raise
        self.jobs.finish_receiving(job_id)
        if resume_id:
            log.info("job %s: resumed by a stream (%d items skipped as finished, %d re-sent, %d awaiting upload)",
                     job_id, skipped, resent, awaiting)
            job = job_proto(self._job(job_id))
            job.resent, job.awaiting_upload = resent, awaiting
            return job
        log.info("job %s: %d items received", job_id, self.jobs.recorded(job_id))
        return job_proto(self.jobs.get(job_id))

    def _dispatch_item(self, job_id: str, n: int, item, seen: set[str], context=None) -> None:
        image_id = item.image_id
        try:
            check_image_id(image_id)
            if image_id in seen:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "this image_id appeared earlier in the same job")
            metadata = check_metadata(item.metadata)
            source = item.WhichOneof("source")
            if source == "image":
                check_photo(item.image, self.settings.image_limits)
            elif source == "location":
                check_location(item.location, self.settings.fetch_policy)
            else:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the item has neither image bytes nor a location")
            if self.jobs.is_cancelled(job_id):
                raise RequestError(grpc.StatusCode.CANCELLED, "job cancelled")
        except RequestError as exc:
            key = image_id if image_id not in seen and _valid_id(image_id) else f"#{n}: {image_id[:64]!r}"
            self.jobs.record_item(job_id, key, refused=True)
            self.jobs.mark_failed(job_id, key, exc.message)
            return
        seen.add(image_id)
        location = item.location if source == "location" else None
        # Recorded before it is sent: a job whose messages are lost can be resumed.
        self.jobs.record_item(job_id, image_id, metadata, location)
        if source == "image" and self._done_unsent(job_id, image_id, metadata, item.image):
            return
        self._send_item(job_id, image_id, metadata, item.image if source == "image" else None, location, context)

    def _done_unsent(self, job_id: str, image_id: str, metadata: dict, image: bytes) -> bool:
        """Marks the item done, unsent, when the index holds its id with the same bytes and
        metadata (unchanged) or, with DELF_DUPLICATES=skip, holds its bytes under another id."""
        known = self._known(job_id, image_id, hashlib.sha256(image).hexdigest(), metadata)
        if known is None:
            return False
        same = (known.get("duplicate_of") or [""])[0]
        if known.get("unchanged"):
            self.jobs.mark_done(job_id, image_id, unchanged=True, duplicate_of=same)
            return True
        if same and self.settings.skip_duplicates:
            self.jobs.mark_done(job_id, image_id, duplicate_of=same, skipped=True)
            return True
        return False

    def _known(self, job_id: str, image_id: str, sha256: str, metadata: dict) -> dict | None:
        """The indexer's answer on these bytes (delf.index.known), or None when it gives none
        soon (the item is then sent as usual: the indexer still reports a duplicate), or
        gave none soon for an earlier item of this job."""
        unanswered = self.__dict__.setdefault("_known_unanswered_jobs", set())
        if job_id in unanswered or not self._indexer_free():
            return None
        try:
            result = self.app.send_task(contract.INDEX_KNOWN, args=[[{"image_id": image_id, "sha256": sha256,
                                                                    "metadata": metadata}]],
                                        queue=self._queue_for(contract.INDEX_KNOWN), expires=KNOWN_TIMEOUT_S)
            reply = result.get(timeout=KNOWN_TIMEOUT_S, disable_sync_subtasks=False)
        except Exception:  # no answer (indexer busy or away): extracted as usual
            if len(unanswered) >= KNOWN_SKIPPED_JOBS_MAX:
                unanswered.clear()
            unanswered.add(job_id)
            log.warning("job %s: no answer from the indexer on the bytes of %s within %.0f s; this job's "
                        "photos are sent without asking", job_id, image_id, KNOWN_TIMEOUT_S,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            return None
        if contract.failure(reply) is not None:
            return None
        return (reply.get("known") or {}).get(image_id)

    def _indexer_free(self) -> bool:
        """A live indexer with nothing queued before a question on bytes: only then is its
        answer worth waiting for (otherwise the photo goes to the workers as usual)."""
        client = self.jobs.redis
        try:
            return bool(celery_app.read_heartbeats(client, self.queue_prefix).get("indexer")) and \
                not client.llen(self._queue_for(contract.INDEX_KNOWN))
        except Exception:  # noqa: BLE001 - Redis hiccups: the send that follows reports them
            return False

    def _send_item(self, job_id: str, image_id: str, metadata: dict, image: bytes | None,
                   location: str | None, context=None) -> None:
        # A full queue slows the stream down (the client's sends block on gRPC flow
        # control) rather than piling photos up in Redis.
        self._wait_for_room(context, "extract")
        payload = {"image_id": image_id, "metadata": metadata, "image": image, "location": location}
        extract = self.app.signature(
            contract.INGEST_EXTRACT, args=(payload, job_id), queue=self._queue_for(contract.INGEST_EXTRACT)
        )
        index = self.app.signature(contract.INGEST_INDEX, args=(job_id,), queue=self._queue_for(contract.INGEST_INDEX))
        with tracing.new_trace("ingest item", job_id=job_id, image_id=image_id):  # one trace per item
            (extract | index).apply_async()

    def GetJob(self, request, context):
        return job_proto(self._job(request.job_id))

    def ResumeJob(self, request, context):
        """Re-sends the recorded items of a stalled or interrupted job that are neither done
        nor failed. Location (path, URL) items go to the workers again; bytes items, which
        the server does not keep, are counted in `awaiting_upload` (the client streams them
        again with `delf-resume-job`). Finished items are never redone."""
        status = self._job(request.job_id)
        self._check_resumable(status, stream=False)
        self._admit("extract")
        job_id = status.job_id
        reopened = self.jobs.reopen(job_id, receiving=True)  # cannot complete while re-sending
        try:
            resent, awaiting = self._resend_unfinished(job_id, context)
        finally:
            self.jobs.finish_receiving(job_id)
        log.info("job %s: resumed (%d re-sent, %d awaiting upload, %d cancelled items reopened)",
                 job_id, resent, awaiting, reopened)
        job = job_proto(self._job(job_id))
        job.resent, job.awaiting_upload = resent, awaiting
        return job

    def resume_stalled_jobs(self, idle_s: float) -> dict[str, tuple[int, int]]:
        """One sweep (DELF_JOB_RESUME_AFTER_S): every RUNNING job with no progress for `idle_s`,
        and every RECEIVING one with no item for that long (its stream died with its gateway),
        is resumed as by ResumeJob. Returns job id -> (re-sent, awaiting upload)."""
        out: dict[str, tuple[int, int]] = {}
        now = time.time()
        for job_id in list(self.jobs.job_ids()):
            status = self.jobs.get(job_id)
            if status is None or status.state not in ("RUNNING", "RECEIVING"):
                continue
            idle = now - status.updated_at if status.state == "RUNNING" else self.jobs.stream_idle_s(job_id)
            if idle < idle_s or not self.jobs.claim_sweep(job_id, idle_s):
                continue
            self.jobs.reopen(job_id, receiving=True)
            try:
                out[job_id] = self._resend_unfinished(job_id, None)
            finally:
                self.jobs.finish_receiving(job_id)
            resent, awaiting = out[job_id]
            log.warning("job %s: no progress for %.0f s: resumed (%d re-sent%s)", job_id, idle, resent,
                        f"; {awaiting} bytes items need `delf ingest PATH --resume {job_id}`" if awaiting else "")
        return out

    def sweep_forever(self, resume_after_s: float, stop: threading.Event) -> None:
        """Every little while: the index tasks of stalled jobs' extracted photos are sent
        again (once per stall, delf_common.parked), and with `resume_after_s` > 0
        (DELF_JOB_RESUME_AFTER_S) jobs with no progress for that long are resumed."""
        stalled_after = self.settings.job_stalled_after_s
        shortest = min(stalled_after, resume_after_s) if resume_after_s > 0 else stalled_after
        interval = min(60.0, max(1.0, shortest / 4))
        while not stop.wait(interval):
            try:
                parked.resend_parked_of_jobs(self.app, self.jobs, stalled_only=True, prefix=self.queue_prefix)
                if resume_after_s > 0:
                    self.resume_stalled_jobs(resume_after_s)
            except Exception:  # Redis away, queue full: the next round tries again
                log.exception("sweeping stalled jobs failed")

    def _check_resumable(self, status: JobStatus, stream: bool) -> None:
        if status.state == "COMPLETED":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"job {status.job_id} has completed; nothing to resume (ingest the photos "
                               f"again in a new job to redo them: an id ingested again is replaced)")
        if status.state == "CANCELLED" and not self.jobs.is_interrupted(status.job_id):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"job {status.job_id} was cancelled; a cancelled job is not resumed "
                               f"(start a new job)")
        if status.state == "RECEIVING" and self.jobs.stream_idle_s(status.job_id) < RESUME_STREAM_IDLE_S:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"job {status.job_id} is still receiving items from its client; resume it "
                               f"once its stream has stopped (no item for {RESUME_STREAM_IDLE_S:.0f} s)")

    def _resend_unfinished(self, job_id: str, context, exclude: set[str] = frozenset()) -> tuple[int, int]:
        """Sends the job's unfinished items (not in `exclude`) again: the index task of those
        extracted already (parked), the whole chain for location items whose extract task is
        not on its way any more (delf_common.inflight: queued, or held by a worker); returns
        (re-sent, unfinished bytes items lost, left for the client to send again)."""
        indexing = set(parked.resend_parked(self.app, self.jobs, job_id, exclude=exclude, prefix=self.queue_prefix))
        resent, awaiting = len(indexing), 0
        unfinished = {i: r for i, r in self.jobs.unfinished(job_id).items() if i not in exclude and i not in indexing}
        waiting = inflight.waiting_items(self.jobs.redis, self._queue_for(contract.INGEST_EXTRACT), job_id) \
            if unfinished else set()
        for image_id, record in sorted(unfinished.items()):
            if image_id in (waiting or ()):
                continue  # its extract task waits in the queue or runs: not lost
            if record["location"] is None:
                awaiting += 1
                continue
            self._send_item(job_id, image_id, record["metadata"], None, record["location"], context)
            resent += 1
        return resent, awaiting

    def CancelJob(self, request, context):
        status = self._job(request.job_id)
        if status.state == "COMPLETED":
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"job {request.job_id} has already completed; nothing to cancel")
        self.jobs.cancel(request.job_id)
        log.info("job %s: cancelled (%d of %d items finished)", request.job_id, status.finished, status.total)
        return job_proto(self._job(request.job_id))

    def WatchJob(self, request, context):
        last = None
        while context.is_active():
            status = self._job(request.job_id)
            current = job_proto(status)
            seen = delf_pb2.Job()
            seen.CopyFrom(current)
            seen.idle_s = 0.0  # changes on every look: not news by itself
            if seen != last:
                yield current
                last = seen
            if status.state in ("COMPLETED", "CANCELLED"):
                return
            time.sleep(0.3)

    def _job(self, job_id: str) -> JobStatus:
        """The job's status: INVALID_ARGUMENT for what is not a job id (it never reaches a
        Redis key), NOT_FOUND for a job id that names no job; a stalled job's hint too."""
        status = self.jobs.get(check_job_id(job_id), explain=True)
        if status is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no job with id {job_id!r}")
        return status


def _valid_id(image_id: str) -> bool:
    try:
        contract.check_image_id(image_id)
    except contract.ContractError:
        return False
    return True


def resume_job_id(context) -> str:
    """The job a StartIngestJob stream continues (metadata `delf-resume-job`), or ""."""
    if context is None:
        return ""
    for key, value in context.invocation_metadata() or ():
        if key == RESUME_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def job_proto(status: JobStatus) -> delf_pb2.Job:
    return delf_pb2.Job(
        job_id=status.job_id,
        state=_JOB_STATES.get(status.state, delf_pb2.JOB_STATE_UNSPECIFIED),
        total=status.total,
        done=status.done,
        failed=status.failed,
        errors=[delf_pb2.ItemError(image_id=i, reason=r) for i, r in status.errors],
        created_at=status.created_at,
        updated_at=status.updated_at,
        rate=status.rate,
        eta_s=status.eta_s,
        stalled=status.stalled,
        hint=status.hint,
        idle_s=status.idle_s,
        unchanged=status.unchanged,
        duplicates=status.duplicates,
        duplicates_skipped=status.duplicates_skipped,
        duplicate_of=status.duplicate_of,
    )
