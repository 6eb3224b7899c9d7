"""The gRPC gateway: the public API (delf.v1.ImageSearch) in front of the workers.

The gateway does no heavy work itself. It checks each request (ids, sizes, the
photo's header), sends Celery tasks to the extractor, indexer and verifier
queues, waits for them within the caller's deadline, and turns their answers
into protobuf. Bad input is answered with INVALID_ARGUMENT, NOT_FOUND or
RESOURCE_EXHAUSTED and a message a person can act on.

This module assembles the servicer from its parts and runs it: request checks
(delf_gateway.checks), backpressure and deadlines (backpressure), search orchestration
(search), ingest jobs (ingest) and the interceptors (interceptors); here live the image
RPCs, TLS, the dependency health watcher, build_server and main.
"""
from __future__ import annotations

import hashlib
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from delf_common import celery_app
from delf_common.addresses import address_in_use, address_taken_message
from delf_common import config, contract
from delf_common import logs
from delf_common import metrics
from delf_common import tracing
from delf_common.proto.delf.v1 import delf_pb2, delf_pb2_grpc
from delf_gateway.checks import check_image_id, check_metadata, check_photo
from delf_gateway.ingest import IngestJobs
from delf_gateway.interceptors import AuthInterceptor, ErrorInterceptor, ObserveInterceptor
from delf_gateway.listing import ListCalls, image_info_proto
from delf_gateway.malformed import MalformedBodyInterceptor
from delf_gateway.search import SearchCalls
from delf_gateway.settings import GatewaySettings

log = logging.getLogger("delf.gateway")


class AddressInUse(config.ConfigError):
    """DELF_GRPC_ADDR is already served by another process."""

SERVICE_NAME = delf_pb2.DESCRIPTOR.services_by_name["ImageSearch"].full_name


class Gateway(SearchCalls, IngestJobs, ListCalls, delf_pb2_grpc.ImageSearchServicer):
    """The delf.v1.ImageSearch servicer: Search from SearchCalls, the job RPCs from
    IngestJobs, ListImages and ListJobs from ListCalls, task sending and admission from
    their base (backpressure.WorkerCalls), and the single-image RPCs below."""

    def AddImage(self, request, context):
        image_id = check_image_id(request.image_id)
        metadata = check_metadata(request.metadata)
        check_photo(request.image, self.settings.image_limits)
        self._admit("extract", "index")
        reply = self._call(contract.EXTRACT, request.image, {"thumbnail": True}, context=context, what="extractor")
        # Optional arguments only when there is something to send: an older indexer takes none.
        sha256 = hashlib.sha256(request.image).hexdigest()  # duplicates (delf_indexer.duplicates)
        reply = self._call(contract.INDEX_ADD, image_id, reply["features"], metadata, reply.get("thumbnail") or b"",
                           sha256, context=context, what="indexer")
        return image_info_proto(reply["image"])

    def GetImage(self, request, context):
        options = ({"thumbnail": True},) if request.thumbnail else ()
        reply = self._call(contract.INDEX_GET, check_image_id(request.image_id), *options, context=context,
                           what="indexer")
        return image_info_proto(reply["image"], reply.get("thumbnail") or b"")

    def DeleteImage(self, request, context):
        image_id = check_image_id(request.image_id)
        reply = self._call(contract.INDEX_DELETE, image_id, context=context, what="indexer")
        return delf_pb2.DeleteImageResponse(image_id=image_id, descriptors_removed=reply["descriptors_removed"])

    def GetStats(self, request, context):
        reply = self._call(contract.INDEX_STATS, context=context, what="indexer")
        return delf_pb2.GetStatsResponse(
            images=reply["images"],
            descriptors=reply["descriptors"],
            queue_depths=self._queue_depths(),
            model=self.settings.model,
            pca_id=reply.get("pca_id", ""),
        )


def tls_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """Server credentials from DELF_TLS_CERT and DELF_TLS_KEY; None when neither is set."""
    cert, key = settings.tls_cert, settings.tls_key
    if not cert and not key:
        return None
    if not (cert and key):
        missing, given = ("DELF_TLS_KEY", "DELF_TLS_CERT") if cert else ("DELF_TLS_CERT", "DELF_TLS_KEY")
        raise config.ConfigError(f"{given} is set but {missing} is not: TLS needs both (or neither)")
    chain = config.read_pem("DELF_TLS_CERT", cert)
    private_key = config.read_pem("DELF_TLS_KEY", key)
    return grpc.ssl_server_credentials([(private_key, chain)])


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN
DEPENDENCIES = config.HEALTH_DEPENDENCIES  # each is a health service name of its own


def dependency_status(client: redis.Redis, prefix: str) -> tuple[dict[str, int], dict[str, str]]:
    """(health status, reason when not SERVING) of each dependency.

    redis: answers a ping. extractor, indexer, verifier: at least one worker of that service
    has a live heartbeat (`delf_common.celery_app.Heartbeat`) under DELF_QUEUE_PREFIX `prefix`.
    milvus: a live indexer reports it reachable (UNKNOWN while no indexer reports)."""
    try:
        client.ping()
        beats = celery_app.read_heartbeats(client, prefix)
    except redis.RedisError as exc:
        reason = f"Redis unreachable: {exc}"
        return ({name: _NOT_SERVING if name == "redis" else _UNKNOWN for name in DEPENDENCIES},
                {name: reason for name in DEPENDENCIES})
    status: dict[str, int] = {"redis": _SERVING}
    reasons: dict[str, str] = {}
    for service in ("extractor", "indexer", "verifier"):
        metrics.LIVE_WORKERS.labels(service).set(len(beats.get(service, [])))
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
                        interval: float, require: tuple[str, ...], prefix: str) -> None:
    """Every DELF_HEALTH_INTERVAL_S: each dependency's status under its own name, and the
    overall one ("" and delf.v1.ImageSearch): SERVING while every dependency named in
    DELF_HEALTH_REQUIRE is SERVING, else NOT_SERVING. Also samples the queue depths."""
    last: dict[str, int] = {}
    while not stop.is_set():
        try:
            status, reasons = dependency_status(client, prefix)
            if status["redis"] == _SERVING:
                for service in contract.SERVICES:
                    metrics.QUEUE_DEPTH.labels(service).set(int(client.llen(contract.queue_name(service, prefix))))
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


def build_server(address: str | None = None, max_workers: int = 32, settings: GatewaySettings | None = None):
    """A started-ready (not yet started) server, its bound port and a stop event; ``settings``
    (default: read from the environment now) serve the whole server's life."""
    settings = settings or GatewaySettings.from_env()
    address = address or settings.grpc_addr
    max_message = settings.max_message_bytes
    credentials = tls_credentials(settings)  # before anything starts: a bad setting fails fast
    interval, require = settings.health_interval_s, settings.health_require
    tokens = settings.auth_tokens
    # Innermost last: a malformed body becomes INVALID_ARGUMENT (gRPC's own answer is INTERNAL).
    interceptors: list[grpc.ServerInterceptor] = [ErrorInterceptor(), MalformedBodyInterceptor()]
    if tokens:
        interceptors.insert(0, AuthInterceptor(tokens))
    interceptors.insert(0, ObserveInterceptor())  # logs and counts refusals by auth too
    traced = tracing.server_interceptor() if tracing.setup("gateway") else None
    if traced is not None:
        interceptors.insert(0, traced)  # outermost: each call's span is current in the others
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            # One owner per address: with gRPC's default SO_REUSEPORT a second gateway binds
            # the same port and the kernel splits clients between two unrelated systems.
            ("grpc.so_reuseport", 0),
        ],
    )
    gateway = Gateway(settings=settings)
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
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises "Failed to bind to address ..."
        port = 0
    if port == 0:
        if address_in_use(address):
            raise AddressInUse(address_taken_message(address))
        raise RuntimeError(f"cannot listen on {address}")
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_dependencies,
        args=(health_servicer, gateway.jobs.redis, stop, interval, require, settings.queue_prefix),
        name="health", daemon=True,
    )
    # Stalled jobs: index tasks of extracted photos re-sent; resumed after DELF_JOB_RESUME_AFTER_S (0: never).
    threading.Thread(target=gateway.sweep_forever, args=(settings.job_resume_after_s, stop),
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
        settings = GatewaySettings.from_env()
        server, port, stop, watcher = build_server(settings=settings)
    except config.ConfigError as exc:
        log.error("cannot start the gateway: %s", exc)
        sys.exit(2)
    try:
        metrics.start_server()
    except OSError as exc:  # the port is taken: serve gRPC anyway, without /metrics
        log.error("cannot serve metrics on DELF_METRICS_PORT=%s: %s (continuing without /metrics)",
                  settings.metrics_port, exc)
    server.start()
    watcher.start()
    tls, auth = bool(settings.tls_cert), bool(settings.auth_tokens)
    log.info("gateway listening on %s (TLS %s, token auth %s)", settings.grpc_addr,
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
    tracing.shutdown()  # flush the spans not exported yet
    log.info("gateway stopped")
