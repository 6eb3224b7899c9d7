"""The gRPC gateway: the public API (delf.v1.ImageSearch) in front of the workers.

The gateway does no heavy work itself. It checks each request (ids, sizes, the
photo's header), sends Celery tasks to the extractor, indexer and verifier
queues, waits for them within the caller's deadline, and turns their answers
into protobuf. Bad input is answered with INVALID_ARGUMENT, NOT_FOUND or
RESOURCE_EXHAUSTED and a message a person can act on.
"""
from __future__ import annotations

import hmac
import logging
import re
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from delf_common import celery_app as tasks
from delf_common import config, fetch
from delf_common import logs
from delf_common import metrics
from delf_common.features import DelfFeatures, encode_array
from delf_common.images import ImageRejected, probe_image
from delf_common.jobs import JobStore, JobStatus
from delf_common.proto.delf.v1 import delf_pb2, delf_pb2_grpc
from delf_common.ranking import rank_matches

log = logging.getLogger("delf.gateway")

SERVICE_NAME = delf_pb2.DESCRIPTOR.services_by_name["ImageSearch"].full_name
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
MAX_ID_LENGTH = 256
MAX_METADATA_BYTES = 16 * 1024
# Metadata filters (SearchRequest.filter): same limits as the indexer's check_filter.
FILTER_KEY = re.compile(r"^[\w.:/-]{1,128}$")
FILTER_MAX_PAIRS = 16
FILTER_MAX_VALUE_BYTES = 1024
VERIFY_CHUNK = 10  # candidates per verify task; chunks run in parallel on the verifier workers
# Time kept back from the caller's deadline to build and send the answer.
DEADLINE_MARGIN_S = 0.2
# How often a stream that waits for room in a full queue looks again.
QUEUE_POLL_S = 0.2
# StartIngestJob metadata naming a job the stream continues (resume).
RESUME_METADATA_KEY = "delf-resume-job"
# Initial metadata of a StartIngestJob answer: the job's id, sent before the stream is read.
JOB_ID_METADATA_KEY = "delf-job-id"
# A RECEIVING job whose last item arrived this recently may still have a live stream.
RESUME_STREAM_IDLE_S = 30.0

_JOB_STATES = {
    "RECEIVING": delf_pb2.JOB_STATE_RECEIVING,
    "RUNNING": delf_pb2.JOB_STATE_RUNNING,
    "COMPLETED": delf_pb2.JOB_STATE_COMPLETED,
    "CANCELLED": delf_pb2.JOB_STATE_CANCELLED,
}


class RequestError(Exception):
    """Ends a call with a gRPC status; raised anywhere below a handler."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _status(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


def check_image_id(image_id: str) -> str:
    if not image_id:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "image_id is empty")
    if len(image_id) > MAX_ID_LENGTH:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"image_id is {len(image_id)} characters; the limit is {MAX_ID_LENGTH}",
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in image_id):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "image_id contains control characters")
    return image_id


def check_metadata(metadata) -> dict[str, str]:
    meta = dict(metadata)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
    if size > MAX_METADATA_BYTES:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"metadata is {size} bytes; the limit is {MAX_METADATA_BYTES}",
        )
    return meta


def check_location(location: str) -> None:
    """URL locations: the checks that need no network (URL ingest on, http/https, host
    allowed, no literal private address); the extractor resolves and checks again before
    it connects. Paths are checked by the extractor (DELF_INGEST_ROOTS)."""
    if not location:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the location is empty")
    if fetch.is_url(location):
        try:
            fetch.check_url(location)
        except fetch.FetchError as exc:
            raise RequestError(_status(exc.code), exc.message) from None


def _resume_job_id(context) -> str:
    """The job a StartIngestJob stream continues (metadata `delf-resume-job`), or ""."""
    if context is None:
        return ""
    for key, value in context.invocation_metadata() or ():
        if key == RESUME_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def check_photo(data: bytes) -> tuple[int, int]:
    """Header-level checks (bytes, pixels, format); the extractor decodes fully."""
    try:
        width, height, _ = probe_image(data)
    except ImageRejected as exc:
        raise RequestError(_status(exc.code), exc.message) from None
    return width, height


class Gateway(delf_pb2_grpc.ImageSearchServicer):
    def __init__(self, app=None, jobs: JobStore | None = None):
        self.app = app or tasks.app
        self.jobs = jobs or JobStore()
        self.default_timeout = config.get("DELF_TASK_TIMEOUT_S")
        self.max_queue = config.get("DELF_MAX_QUEUE")
        self.max_searches = config.get("DELF_MAX_SEARCHES")
        self._search_slots = threading.BoundedSemaphore(self.max_searches) if self.max_searches > 0 else None

    # -- plumbing ---------------------------------------------------------------

    def _budget(self, context) -> float:
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.default_timeout
        return max(min(remaining - DEADLINE_MARGIN_S, self.default_timeout), 0.01)

    def _send(self, name: str, *args, context=None):
        # A task whose caller has given up is dropped by the worker unrun (Celery's
        # `expires`): under overload, workers spend no time on answers nobody awaits.
        expires = self._budget(context) + DEADLINE_MARGIN_S if context is not None else None
        return self.app.send_task(name, args=list(args), queue=tasks.queue_for_task(name), expires=expires)

    def _wait(self, result, context, what: str) -> dict:
        try:
            reply = result.get(timeout=self._budget(context), disable_sync_subtasks=False)
        except CeleryTimeout:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the {what} workers did not answer in time (are they running? queue depths: "
                f"{self._queue_depths()})",
            ) from None
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RequestError(_status(err.get("code", "INTERNAL")), err.get("message", f"{what} failed"))
        return reply

    def _call(self, name: str, *args, context=None, what: str) -> dict:
        return self._wait(self._send(name, *args, context=context), context, what)

    def _queue_depths(self) -> dict[str, int]:
        client = self.jobs.redis
        try:
            return {s: int(client.llen(tasks.queue_name(s))) for s in tasks.SERVICES}
        except redis.RedisError:
            return {}

    # -- backpressure -------------------------------------------------------------

    def _full_queue(self, services) -> tuple[str, int] | None:
        """The first of `services` whose queue holds DELF_MAX_QUEUE tasks or more, and its depth."""
        if self.max_queue <= 0:
            return None
        client = self.jobs.redis
        for service in services:
            depth = int(client.llen(tasks.queue_name(service)))
            metrics.QUEUE_DEPTH.labels(service).set(depth)
            if depth >= self.max_queue:
                return service, depth
        return None

    def _refusal(self, service: str, depth: int) -> RequestError:
        metrics.BACKPRESSURE_REFUSALS.labels(service, "refused").inc()
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the {service} queue holds {depth} tasks (limit DELF_MAX_QUEUE={self.max_queue}); "
            f"the system is overloaded, retry later",
        )

    def _admit(self, *services: str) -> None:
        """RESOURCE_EXHAUSTED at once when a queue this call needs is full."""
        full = self._full_queue(services)
        if full is not None:
            raise self._refusal(*full)

    def _wait_for_room(self, context, *services: str) -> None:
        """Block (polling) until every queue in `services` has room, within the caller's deadline
        (else DELF_TASK_TIMEOUT_S). Slows a client stream down instead of filling Redis."""
        full = self._full_queue(services)
        if full is None:
            return
        metrics.BACKPRESSURE_REFUSALS.labels(full[0], "waited").inc()
        give_up = time.monotonic() + self._budget(context)
        while full is not None:
            if context is not None and not context.is_active():
                raise RequestError(grpc.StatusCode.CANCELLED, "the client went away")
            if time.monotonic() >= give_up:
                service, depth = full
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the {service} queue still holds {depth} tasks (limit DELF_MAX_QUEUE="
                    f"{self.max_queue}) after waiting for the workers; the items sent so far were "
                    f"kept, retry the rest later",
                )
            time.sleep(QUEUE_POLL_S)
            full = self._full_queue(services)

    # -- search -----------------------------------------------------------------

    def Search(self, request, context):
        slots = self._search_slots
        if slots is not None and not slots.acquire(blocking=False):
            metrics.BACKPRESSURE_REFUSALS.labels("search", "refused").inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this gateway is already working on {self.max_searches} searches (limit "
                f"DELF_MAX_SEARCHES={self.max_searches}); the system is overloaded, retry later",
            )
        try:
            return self._search(request, context)
        finally:
            if slots is not None:
                slots.release()

    def _search(self, request, context):
        started = time.monotonic()
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k > MAX_TOP_K:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k is {top_k}; the limit is {MAX_TOP_K}")
        filter = self._check_filter(request.filter)
        which = request.WhichOneof("query")
        exclude: list[str] = []
        if which == "image":
            width, height = check_photo(request.image)
            self._admit("extract", "index", "verify")
            reply = self._call(tasks.EXTRACT, request.image, {}, context=context, what="extractor")
            features = DelfFeatures.from_wire(reply["features"])
        elif which == "image_id":
            image_id = check_image_id(request.image_id)
            self._admit("index", "verify")
            reply = self._call(tasks.INDEX_FEATURES, image_id, context=context, what="indexer")
            features = DelfFeatures.from_wire(reply["features"])
            width, height = features.image_size
            exclude.append(image_id)
        else:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "give the query as image bytes or an image_id")

        box = None
        if request.HasField("box"):
            box = self._check_box(request.box, width, height)
            features = features.inside(box)

        response = delf_pb2.SearchResponse(query_features=len(features))
        if len(features) == 0:
            response.elapsed_s = time.monotonic() - started
            return response

        shortlist = max(config.get("DELF_SHORTLIST"), top_k)
        options = {"shortlist": shortlist, "exclude": exclude}
        if filter:
            options["filter"] = filter
        reply = self._call(tasks.INDEX_SEARCH, features.to_wire(), options, context=context, what="indexer")
        candidates = reply["candidates"]
        metadata = {c["image_id"]: c.get("metadata") or {} for c in candidates}
        matches = self._verify(features, (width, height), box, candidates, context)
        for m in rank_matches(matches)[:top_k]:
            response.matches.append(self._match_proto(m, metadata.get(m["image_id"], {}), len(features)))
        response.elapsed_s = time.monotonic() - started
        return response

    @staticmethod
    def _check_filter(pairs) -> dict[str, str]:
        """The metadata filter: every key/value pair must equal the image's (exact strings).
        The indexer applies the same rules (delf_indexer.store.check_filter)."""
        pairs = dict(pairs)
        if len(pairs) > FILTER_MAX_PAIRS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the filter has {len(pairs)} pairs; the limit is {FILTER_MAX_PAIRS}")
        for key, value in pairs.items():
            if not FILTER_KEY.match(key):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"filter key {key[:40]!r} must be 1-128 letters, digits or _ . : / - "
                    f"(no spaces or quotes)")
            if len(value.encode("utf-8")) > FILTER_MAX_VALUE_BYTES:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the filter value of {key!r} is {len(value.encode('utf-8'))} bytes; "
                    f"the limit is {FILTER_MAX_VALUE_BYTES}")
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"the filter value of {key!r} contains control characters")
        return pairs

    def _check_box(self, box, width: int, height: int) -> tuple[float, float, float, float]:
        values = (box.x0, box.y0, box.x1, box.y1)
        if not all(np.isfinite(values)):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the box has a non-finite coordinate")
        x0, y0 = max(box.x0, 0.0), max(box.y0, 0.0)
        x1, y1 = min(box.x1, float(width)), min(box.y1, float(height))
        if x1 <= x0 or y1 <= y0:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the box ({box.x0:g},{box.y0:g})-({box.x1:g},{box.y1:g}) does not overlap the "
                f"{width}x{height} image (x0 < x1 and y0 < y1 are required)",
            )
        return x0, y0, x1, y1

    def _verify(self, features: DelfFeatures, size, box, candidates: list[dict], context) -> list[dict]:
        if not candidates:
            return []
        query = {
            "locations": encode_array(features.locations),
            "scales": encode_array(np.asarray(features.scales, np.float32)),
            "image_size": list(size),
            "box": list(box) if box else None,
        }
        options = {
            "min_inliers": config.get("DELF_MIN_INLIERS"),
            "min_inlier_ratio": config.get("DELF_MIN_INLIER_RATIO"),
            "ransac_px": config.get("DELF_RANSAC_PX"),
        }
        pending = [
            self._send(tasks.VERIFY, query, candidates[i:i + VERIFY_CHUNK], options, context=context)
            for i in range(0, len(candidates), VERIFY_CHUNK)
        ]
        matches: list[dict] = []
        for result in pending:
            matches.extend(self._wait(result, context, "verifier")["matches"])
        return matches

    @staticmethod
    def _match_proto(m: dict, metadata: dict, n_query: int) -> delf_pb2.Match:
        verified = bool(m["verified"])
        score = float(m["inliers"]) if verified else float(m["votes"]) / max(n_query, 1)
        match = delf_pb2.Match(
            image_id=m["image_id"],
            metadata=metadata,
            inliers=int(m["inliers"]),
            score=score,
            verified=verified,
            votes=int(m["votes"]),
            transform=[float(v) for v in m.get("transform") or []],
        )
        for x, y in m.get("corners") or []:
            match.corners.append(delf_pb2.Point(x=float(x), y=float(y)))
        return match

    # -- images -----------------------------------------------------------------

    def AddImage(self, request, context):
        image_id = check_image_id(request.image_id)
        metadata = check_metadata(request.metadata)
        check_photo(request.image)
        self._admit("extract", "index")
        reply = self._call(tasks.EXTRACT, request.image, {}, context=context, what="extractor")
        reply = self._call(tasks.INDEX_ADD, image_id, reply["features"], metadata, context=context, what="indexer")
        return image_info_proto(reply["image"])

    def GetImage(self, request, context):
        reply = self._call(tasks.INDEX_GET, check_image_id(request.image_id), context=context, what="indexer")
        return image_info_proto(reply["image"])

    def DeleteImage(self, request, context):
        image_id = check_image_id(request.image_id)
        reply = self._call(tasks.INDEX_DELETE, image_id, context=context, what="indexer")
        return delf_pb2.DeleteImageResponse(image_id=image_id, descriptors_removed=reply["descriptors_removed"])

    def GetStats(self, request, context):
        reply = self._call(tasks.INDEX_STATS, context=context, what="indexer")
        return delf_pb2.GetStatsResponse(
            images=reply["images"],
            descriptors=reply["descriptors"],
            queue_depths=self._queue_depths(),
            model=config.get("DELF_MODEL"),
            pca_id=reply.get("pca_id", ""),
        )

    # -- bulk ingestion ---------------------------------------------------------

    def StartIngestJob(self, request_iterator, context):
        resume_id = _resume_job_id(context)
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
                check_photo(item.image)
            elif source == "location":
                check_location(item.location)
            else:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the item has neither image bytes nor a location")
            if self.jobs.is_cancelled(job_id):
                raise RequestError(grpc.StatusCode.CANCELLED, "job cancelled")
        except RequestError as exc:
            key = image_id if image_id and image_id not in seen and len(image_id) <= MAX_ID_LENGTH else f"#{n}: {image_id[:64]!r}"
            self.jobs.record_item(job_id, key, refused=True)
            self.jobs.mark_failed(job_id, key, exc.message)
            return
        seen.add(image_id)
        location = item.location if source == "location" else None
        # Recorded before it is sent: a job whose messages are lost can be resumed.
        self.jobs.record_item(job_id, image_id, metadata, location)
        self._send_item(job_id, image_id, metadata, item.image if source == "image" else None, location, context)

    def _send_item(self, job_id: str, image_id: str, metadata: dict, image: bytes | None,
                   location: str | None, context=None) -> None:
        # A full queue slows the stream down (the client's sends block on gRPC flow
        # control) rather than piling photos up in Redis.
        self._wait_for_room(context, "extract")
        payload = {"image_id": image_id, "metadata": metadata, "image": image, "location": location}
        extract = self.app.signature(
            tasks.INGEST_EXTRACT, args=(payload, job_id), queue=tasks.queue_for_task(tasks.INGEST_EXTRACT)
        )
        index = self.app.signature(
            tasks.INGEST_INDEX, args=(job_id,), queue=tasks.queue_for_task(tasks.INGEST_INDEX)
        )
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

    def sweep_forever(self, idle_s: float, stop: threading.Event) -> None:
        interval = min(60.0, max(1.0, idle_s / 4))
        while not stop.wait(interval):
            try:
                self.resume_stalled_jobs(idle_s)
            except Exception:  # noqa: BLE001 - Redis away, queue full: the next round tries again
                log.exception("resuming stalled jobs failed")

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
        """Sends the job's unfinished location items (not in `exclude`) again;
        returns (re-sent, unfinished bytes items left for the client)."""
        resent = awaiting = 0
        for image_id, record in sorted(self.jobs.unfinished(job_id).items()):
            if image_id in exclude:
                continue
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
            if current != last:
                yield current
                last = current
            if status.state in ("COMPLETED", "CANCELLED"):
                return
            time.sleep(0.3)

    def _job(self, job_id: str) -> JobStatus:
        status = self.jobs.get(job_id) if job_id else None
        if status is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no job with id {job_id!r}")
        return status


def image_info_proto(info: dict) -> delf_pb2.ImageInfo:
    return delf_pb2.ImageInfo(
        image_id=info["image_id"],
        metadata=info.get("metadata") or {},
        width=int(info.get("width", 0)),
        height=int(info.get("height", 0)),
        num_features=int(info.get("num_features", 0)),
        pca_id=info.get("pca_id", ""),
    )


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
    )


class _ErrorInterceptor(grpc.ServerInterceptor):
    """Turns RequestError (and unexpected exceptions) into a gRPC status."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(fn):
            def call(request_or_iterator, context):
                try:
                    return fn(request_or_iterator, context)
                except RequestError as exc:
                    context.abort(exc.code, exc.message)
                except grpc.RpcError:
                    raise
                except redis.RedisError as exc:
                    log.exception("%s: Redis unavailable", method)
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"the broker is unavailable: {exc}")
                except Exception as exc:  # noqa: BLE001 - the server must keep serving
                    if context.code() is not None:  # already aborted
                        raise
                    log.exception("%s failed", method)
                    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return call

        def wrap_stream(fn):
            def call(request, context):
                try:
                    yield from fn(request, context)
                except RequestError as exc:
                    context.abort(exc.code, exc.message)
                except grpc.RpcError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    log.exception("%s failed", method)
                    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        return handler


_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")  # probes: their log lines at DEBUG
_ERROR_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
_WARNING_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def _request_id(metadata) -> str:
    """The caller's `x-request-id` when it is a sensible id, else a new one."""
    for key, value in metadata or ():
        if key == logs.REQUEST_ID_HEADER:
            return logs.clean_request_id(value) or logs.new_request_id()
    return logs.new_request_id()


def _job_id_of(message) -> str | None:
    value = getattr(message, "job_id", None)
    return value if isinstance(value, str) and value else None


class _RequestIdContext:
    """The servicer context a handler sees: `x-request-id` rides along with any initial or
    trailing metadata the handler sends; everything else goes to the real context."""

    def __init__(self, context, request_id: str):
        self._context = context
        self._pair = (logs.REQUEST_ID_HEADER, request_id)

    def send_initial_metadata(self, metadata):
        return self._context.send_initial_metadata(tuple(metadata or ()) + (self._pair,))

    def set_trailing_metadata(self, metadata):
        return self._context.set_trailing_metadata(tuple(metadata or ()) + (self._pair,))

    def __getattr__(self, name):
        return getattr(self._context, name)


class _ObserveInterceptor(grpc.ServerInterceptor):
    """Outermost: gives every call a request id (the caller's `x-request-id` or a new one),
    sends it back in the trailing metadata (and in the initial metadata when the handler
    sends some), binds it for the logs and the Celery tasks the call sends, then logs one
    line per call (method, status code, duration, ids) and counts and times it
    (delf_common.metrics)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method or ""
        method = full_method.rsplit("/", 1)[-1] or "unknown"
        quiet = full_method.startswith(_QUIET_PREFIXES)
        request_id = _request_id(handler_call_details.invocation_metadata)

        def begin(context, request) -> list:
            tokens = logs.bind(request_id=request_id, job_id=_job_id_of(request))
            try:
                context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, request_id),))
            except Exception:  # noqa: BLE001 - e.g. the call is already over
                pass
            return tokens

        def finish(context, started: float, failed: bool, tokens: list, reply=None) -> None:
            try:
                elapsed = time.monotonic() - started
                code = context.code()
                if code is None:
                    name = "UNKNOWN" if failed else "OK"
                else:
                    name = getattr(code, "name", str(code))
                metrics.GATEWAY_REQUESTS.labels(method, name).inc()
                metrics.GATEWAY_LATENCY.labels(method).observe(elapsed)
                level = (logging.DEBUG if quiet and name == "OK" else logging.ERROR if name in _ERROR_CODES
                         else logging.WARNING if name in _WARNING_CODES else logging.INFO)
                if not log.isEnabledFor(level):
                    return
                extra = {"method": method, "code": name, "duration_s": round(elapsed, 4)}
                job_id = _job_id_of(reply)
                if job_id:
                    extra["job_id"] = job_id
                details = None
                if name != "OK":
                    with_details = getattr(context, "details", None)
                    details = with_details() if callable(with_details) else None
                    if isinstance(details, bytes):
                        details = details.decode("utf-8", "replace")
                if details:
                    extra["error"] = str(details)[:500]
                log.log(level, "%s %s in %.3f s%s", method, name, elapsed,
                        f": {str(details)[:500]}" if details else "", extra=extra)
            finally:
                logs.unbind(tokens)

        def wrap_unary(fn):
            def call(request_or_iterator, context):
                started, failed, reply = time.monotonic(), True, None
                tokens = begin(context, request_or_iterator)
                try:
                    reply = fn(request_or_iterator, _RequestIdContext(context, request_id))
                    failed = False
                    return reply
                finally:
                    finish(context, started, failed, tokens, reply)
            return call

        def wrap_stream(fn):
            def call(request_or_iterator, context):
                started, failed = time.monotonic(), True
                tokens = begin(context, request_or_iterator)
                try:
                    yield from fn(request_or_iterator, _RequestIdContext(context, request_id))
                    failed = False
                finally:
                    finish(context, started, failed, tokens)
            return call

        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), *args)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), *args)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), *args)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), *args)
        return handler


_MetricsInterceptor = _ObserveInterceptor  # its former name


AUTH_PREFIX = "/delf.v1."  # methods that need a token; health and reflection stay open
_AUTH_HELP = "send the metadata `authorization: Bearer <token>` (delf CLI: --token or DELF_TOKEN)"


class _AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` with one of `tokens` on every delf.v1 method."""

    def __init__(self, tokens):
        self.tokens = [t.encode() for t in tokens if t]

    def _refusal(self, metadata) -> str | None:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return f"missing credentials: {_AUTH_HELP}"
        if len(values) > 1:
            return "malformed credentials: more than one authorization header"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "malformed credentials: the authorization header must be `Bearer <token>`"
        given = token.encode()
        ok = False
        for accepted in self.tokens:  # no early exit: constant time over the list
            ok |= hmac.compare_digest(given, accepted)
        return None if ok else "invalid credentials: the bearer token is not accepted"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not method.startswith(AUTH_PREFIX):
            return continuation(handler_call_details)
        refusal = self._refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without auth
        log.warning("%s: UNAUTHENTICATED (%s)", method, refusal.split(":")[0])

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

        def deny_stream(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
            yield  # pragma: no cover - makes this a generator

        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, *args)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, *args)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, *args)
        return grpc.stream_stream_rpc_method_handler(deny_stream, *args)


def tls_credentials() -> grpc.ServerCredentials | None:
    """Server credentials from DELF_TLS_CERT and DELF_TLS_KEY; None when neither is set."""
    cert, key = config.get("DELF_TLS_CERT"), config.get("DELF_TLS_KEY")
    if not cert and not key:
        return None
    if not (cert and key):
        missing, given = ("DELF_TLS_KEY", "DELF_TLS_CERT") if cert else ("DELF_TLS_CERT", "DELF_TLS_KEY")
        raise config.ConfigError(f"{given} is set but {missing} is not: TLS needs both (or neither)")
    chain = config.read_pem("DELF_TLS_CERT")
    private_key = config.read_pem("DELF_TLS_KEY")
    return grpc.ssl_server_credentials([(private_key, chain)])


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN
DEPENDENCIES = config.HEALTH_DEPENDENCIES  # each is a health service name of its own


def dependency_status(client: redis.Redis) -> tuple[dict[str, int], dict[str, str]]:
    """(health status, reason when not SERVING) of each dependency.

    redis: answers a ping. extractor, indexer, verifier: at least one worker of that service
    has a live heartbeat (`delf_common.celery_app.Heartbeat`). milvus: a live indexer reports
    it reachable (UNKNOWN while no indexer reports)."""
    try:
        client.ping()
        beats = tasks.read_heartbeats(client)
    except redis.RedisError as exc:
        reason = f"Redis unreachable: {exc}"
        return ({name: _NOT_SERVING if name == "redis" else _UNKNOWN for name in DEPENDENCIES},
                {name: reason for name in DEPENDENCIES})
    status: dict[str, int] = {"redis": _SERVING}
    reasons: dict[str, str] = {}
    for service in ("extractor", "indexer", "verifier"):
        alive = bool(beats.get(service))
        status[service] = _SERVING if alive else _NOT_SERVING
        if not alive:
            reasons[service] = "no live worker heartbeat"
    reports = [b.get("checks", {}).get("milvus") for b in beats.get("indexer", [])]
    reports = [r for r in reports if isinstance(r, dict)]
    if not reports:
        status["milvus"] = _UNKNOWN
        reasons["milvus"] = "no indexer reports on it"
    elif any(r.get("ok") for r in reports):
        status["milvus"] = _SERVING
    else:
        status["milvus"] = _NOT_SERVING
        reasons["milvus"] = "; ".join(sorted({str(r.get("error", "unreachable")) for r in reports}))[:500]
    return status, reasons


def _watch_dependencies(health_servicer: health.HealthServicer, client: redis.Redis, stop: threading.Event,
                        interval: float | None = None, require: tuple[str, ...] | None = None) -> None:
    """Every DELF_HEALTH_INTERVAL_S: each dependency's status under its own name, and the
    overall one ("" and delf.v1.ImageSearch): SERVING while every dependency named in
    DELF_HEALTH_REQUIRE is SERVING, else NOT_SERVING. Also samples the queue depths."""
    interval = config.get("DELF_HEALTH_INTERVAL_S") if interval is None else interval
    require = config.get("DELF_HEALTH_REQUIRE") if require is None else require
    last: dict[str, int] = {}
    while not stop.is_set():
        try:
            status, reasons = dependency_status(client)
            if status["redis"] == _SERVING:
                for service in tasks.SERVICES:
                    metrics.QUEUE_DEPTH.labels(service).set(int(client.llen(tasks.queue_name(service))))
        except Exception as exc:  # noqa: BLE001 - the watcher must keep watching
            status = {name: _UNKNOWN for name in DEPENDENCIES}
            status["redis"] = _NOT_SERVING
            reasons = {"redis": f"{type(exc).__name__}: {exc}"}
        down = [name for name in require if status.get(name) != _SERVING]
        overall = _NOT_SERVING if down else _SERVING
        current = dict(status)
        current[""] = current[SERVICE_NAME] = overall
        changed = {name: st for name, st in current.items() if last.get(name) != st}
        for name, st in changed.items():
            health_servicer.set(name, st)
        if changed:
            name_of = health_pb2.HealthCheckResponse.ServingStatus.Name
            if down:
                log.warning("health: NOT_SERVING; down: %s",
                            "; ".join(f"{n} ({reasons.get(n, name_of(status.get(n, _UNKNOWN)))})" for n in down),
                            extra={"health": {n: name_of(st) for n, st in status.items()}})
            else:
                log.info("health: SERVING (%s up)", ", ".join(require) or "no dependency required",
                         extra={"health": {n: name_of(st) for n, st in status.items()}})
        last = current
        stop.wait(interval)


def build_server(address: str | None = None, max_workers: int = 32):
    """A started-ready (not yet started) server, its bound port and a stop event."""
    address = address or config.get("DELF_GRPC_ADDR")
    max_message = config.get("DELF_MAX_MESSAGE_BYTES")
    credentials = tls_credentials()  # before anything starts: a bad setting fails fast
    interval, require = config.get("DELF_HEALTH_INTERVAL_S"), config.get("DELF_HEALTH_REQUIRE")
    tokens = config.get("DELF_AUTH_TOKENS")
    interceptors: list[grpc.ServerInterceptor] = [_ErrorInterceptor()]
    if tokens:
        interceptors.insert(0, _AuthInterceptor(tokens))
    interceptors.insert(0, _ObserveInterceptor())  # outermost: logs and counts refusals by auth too
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ],
    )
    gateway = Gateway()
    delf_pb2_grpc.add_ImageSearchServicer_to_server(gateway, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in DEPENDENCIES:  # until the watcher's first round
        health_servicer.set(name, health_pb2.HealthCheckResponse.UNKNOWN)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_dependencies, args=(health_servicer, gateway.jobs.redis, stop, interval, require),
        name="health", daemon=True,
    )
    if config.get("DELF_JOB_RESUME_AFTER_S") > 0:  # off by default
        threading.Thread(target=gateway.sweep_forever, args=(config.get("DELF_JOB_RESUME_AFTER_S"), stop),
                         name="job-sweep", daemon=True).start()
    return server, port, stop, watcher


def main() -> None:
    try:
        logs.setup("gateway")
    except config.ConfigError as exc:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.error("cannot start the gateway: %s", exc)
        sys.exit(2)
    try:
        server, port, stop, watcher = build_server()
    except config.ConfigError as exc:
        log.error("cannot start the gateway: %s", exc)
        sys.exit(2)
    try:
        metrics.start_server()
    except OSError as exc:  # the port is taken: serve gRPC anyway, without /metrics
        log.error("cannot serve metrics on DELF_METRICS_PORT=%s: %s (continuing without /metrics)",
                  config.get("DELF_METRICS_PORT"), exc)
    server.start()
    watcher.start()
    tls = bool(config.get("DELF_TLS_CERT"))
    auth = bool(config.get("DELF_AUTH_TOKENS"))
    log.info("gateway listening on %s (TLS %s, token auth %s)", config.get("DELF_GRPC_ADDR"),
             "on" if tls else "off", "on" if auth else "off")
    if auth and not tls:
        log.warning("DELF_AUTH_TOKENS is set without TLS: tokens travel in plaintext "
                    "(set DELF_TLS_CERT and DELF_TLS_KEY unless a TLS proxy is in front)")

    def shutdown(signum, frame):
        log.info("signal %d: stopping", signum)
        stop.set()
        server.stop(grace=5)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait_for_termination()
    log.info("gateway stopped")
