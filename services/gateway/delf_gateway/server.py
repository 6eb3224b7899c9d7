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
from delf_common import config
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
VERIFY_CHUNK = 10  # candidates per verify task; chunks run in parallel on the verifier workers
# Time kept back from the caller's deadline to build and send the answer.
DEADLINE_MARGIN_S = 0.2
# How often a stream that waits for room in a full queue looks again.
QUEUE_POLL_S = 0.2

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

    # -- plumbing ---------------------------------------------------------------

    def _budget(self, context) -> float:
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.default_timeout
        return max(min(remaining - DEADLINE_MARGIN_S, self.default_timeout), 0.01)

    def _send(self, name: str, *args):
        return self.app.send_task(name, args=list(args), queue=tasks.queue_for_task(name))

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
        return self._wait(self._send(name, *args), context, what)

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
        started = time.monotonic()
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k > MAX_TOP_K:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k is {top_k}; the limit is {MAX_TOP_K}")
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
        reply = self._call(
            tasks.INDEX_SEARCH, features.to_wire(), {"shortlist": shortlist, "exclude": exclude},
            context=context, what="indexer",
        )
        candidates = reply["candidates"]
        metadata = {c["image_id"]: c.get("metadata") or {} for c in candidates}
        matches = self._verify(features, (width, height), box, candidates, context)
        for m in rank_matches(matches)[:top_k]:
            response.matches.append(self._match_proto(m, metadata.get(m["image_id"], {}), len(features)))
        response.elapsed_s = time.monotonic() - started
        return response

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
            "image_size": list(size),
            "box": list(box) if box else None,
        }
        options = {
            "min_inliers": config.get("DELF_MIN_INLIERS"),
            "min_inlier_ratio": config.get("DELF_MIN_INLIER_RATIO"),
            "ransac_px": config.get("DELF_RANSAC_PX"),
        }
        pending = [
            self._send(tasks.VERIFY, query, candidates[i:i + VERIFY_CHUNK], options)
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
        self._admit("extract")  # before a job exists: a full system takes no new job
        job_id = self.jobs.create()
        seen: set[str] = set()
        total = 0
        try:
            for n, item in enumerate(request_iterator):
                total += 1
                self._dispatch_item(job_id, n, item, seen, context)
        except Exception:
            # The client went away mid-stream: keep what was dispatched, end the job.
            self.jobs.set_total(job_id, total)
            self.jobs.cancel(job_id)
            raise
        self.jobs.set_total(job_id, total)
        log.info("job %s: %d items received", job_id, total)
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
            elif source != "location":
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the item has neither image bytes nor a location")
            if self.jobs.is_cancelled(job_id):
                raise RequestError(grpc.StatusCode.CANCELLED, "job cancelled")
        except RequestError as exc:
            key = image_id if image_id and image_id not in seen and len(image_id) <= MAX_ID_LENGTH else f"#{n}: {image_id[:64]!r}"
            self.jobs.mark_failed(job_id, key, exc.message)
            return
        # A full queue slows the stream down (the client's sends block on gRPC flow
        # control) rather than piling photos up in Redis.
        self._wait_for_room(context, "extract")
        seen.add(image_id)
        payload = {
            "image_id": image_id,
            "metadata": metadata,
            "image": item.image if source == "image" else None,
            "location": item.location if source == "location" else None,
        }
        extract = self.app.signature(
            tasks.INGEST_EXTRACT, args=(payload, job_id), queue=tasks.queue_for_task(tasks.INGEST_EXTRACT)
        )
        index = self.app.signature(
            tasks.INGEST_INDEX, args=(job_id,), queue=tasks.queue_for_task(tasks.INGEST_INDEX)
        )
        (extract | index).apply_async()

    def GetJob(self, request, context):
        return job_proto(self._job(request.job_id))

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


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and status code and times it (delf_common.metrics)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = (handler_call_details.method or "").rsplit("/", 1)[-1] or "unknown"

        def record(context, started: float, failed: bool) -> None:
            code = context.code()
            if code is None:
                name = "UNKNOWN" if failed else "OK"
            else:
                name = getattr(code, "name", str(code))
            metrics.GATEWAY_REQUESTS.labels(method, name).inc()
            metrics.GATEWAY_LATENCY.labels(method).observe(time.monotonic() - started)

        def wrap_unary(fn):
            def call(request_or_iterator, context):
                started, failed = time.monotonic(), True
                try:
                    reply = fn(request_or_iterator, context)
                    failed = False
                    return reply
                finally:
                    record(context, started, failed)
            return call

        def wrap_stream(fn):
            def call(request_or_iterator, context):
                started, failed = time.monotonic(), True
                try:
                    yield from fn(request_or_iterator, context)
                    failed = False
                finally:
                    record(context, started, failed)
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


def _watch_dependencies(health_servicer: health.HealthServicer, client: redis.Redis, stop: threading.Event) -> None:
    """SERVING while the broker answers, NOT_SERVING otherwise; samples the queue depths."""
    last = None
    while not stop.is_set():
        try:
            client.ping()
            for service in tasks.SERVICES:
                metrics.QUEUE_DEPTH.labels(service).set(int(client.llen(tasks.queue_name(service))))
            status = health_pb2.HealthCheckResponse.SERVING
        except redis.RedisError:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last:
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, status)
            log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            last = status
        stop.wait(2.0)


def build_server(address: str | None = None, max_workers: int = 32):
    """A started-ready (not yet started) server, its bound port and a stop event."""
    address = address or config.get("DELF_GRPC_ADDR")
    max_message = config.get("DELF_MAX_MESSAGE_BYTES")
    credentials = tls_credentials()  # before anything starts: a bad setting fails fast
    tokens = config.get("DELF_AUTH_TOKENS")
    interceptors: list[grpc.ServerInterceptor] = [_ErrorInterceptor()]
    if tokens:
        interceptors.insert(0, _AuthInterceptor(tokens))
    interceptors.insert(0, _MetricsInterceptor())  # outermost: counts refusals by auth too
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
        target=_watch_dependencies, args=(health_servicer, gateway.jobs.redis, stop), daemon=True
    )
    return server, port, stop, watcher


def main() -> None:
    logging.basicConfig(
        level=config.get("DELF_LOG_LEVEL"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
