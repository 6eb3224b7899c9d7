"""The Celery application every service shares: broker, serialization, routing.

The task names and the queue each is routed to are part of the internal contract
(delf_common.contract); this module builds the app that routes them.

Each worker service imports this app and registers only its own tasks; the
gateway sends tasks by name (`send_task`) and never imports torch or Milvus.
Messages are msgpack (binary-safe, never pickle).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from concurrent import futures
from typing import Callable

from celery import Celery, signals
from kombu import Queue

from delf_common import config, logs, tracing
from delf_common.contract import (
    INDEX_ADD, INDEX_DELETE, INDEX_FEATURES, INDEX_GET, INGEST_EXTRACT, INGEST_INDEX, ROUTES, SERVICES, failure,
    queue_for_task, queue_name,
)


def broker_transport_options() -> dict:
    """Redis transport options: how soon a dead worker's unacknowledged task is redelivered.

    A task taken by a worker is parked in Redis' ``unacked`` hash until acknowledged
    (``task_acks_late``). A warm shutdown hands it back at once; a worker that dies
    (SIGKILL, OOM, host lost) cannot, and the task is redelivered only once it is older
    than ``DELF_VISIBILITY_TIMEOUT_S`` *and* a live worker's periodic sweep finds it.
    kombu sweeps every ``unacked_restore_interval * unacked_restore_throttle`` seconds
    (10 x 10 by default): sweep on every interval, at most a quarter of the timeout
    apart (1-10 s).
    """
    timeout = float(config.get("DELF_VISIBILITY_TIMEOUT_S"))
    if timeout <= 0:
        raise config.ConfigError(f"DELF_VISIBILITY_TIMEOUT_S={timeout}: must be positive")
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": int(min(10, max(1, timeout // 4))),
        "unacked_restore_throttle": 1,
    }


# How a *worker* publishes (the next task of an ingest chain, a retry) while Redis
# restarts: keep trying for about a minute. Celery's default gives up after 0.6 s and
# fails the task after its work was done; the item then waits for redelivery
# (DELF_VISIBILITY_TIMEOUT_S) or is lost. The gateway keeps the default: a client
# waiting on a search should hear UNAVAILABLE at once, not after a minute.
WORKER_PUBLISH_RETRY_POLICY = {"max_retries": 30, "interval_start": 0.5,
                               "interval_step": 0.5, "interval_max": 3.0}


def configure_worker(app: Celery) -> None:
    """Settings for the worker services' processes (called by their task modules)."""
    app.conf.task_publish_retry_policy = dict(WORKER_PUBLISH_RETRY_POLICY)


def make_app(name: str = "delf") -> Celery:
    """The app, its queue names from DELF_QUEUE_PREFIX read now; ``queue_prefix(app)`` gives
    that prefix to code holding the app."""
    url = config.get("DELF_REDIS_URL")
    prefix = config.get("DELF_QUEUE_PREFIX")
    app = Celery(name, broker=url, backend=url)
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
        task_routes={task: {"queue": queue_for_task(task, prefix)} for task in ROUTES},
        task_queues=[Queue(queue_name(s, prefix)) for s in SERVICES],
        task_default_queue=queue_name("extract", prefix),
        delf_queue_prefix=prefix,
        # One task at a time per worker process; a task is acknowledged only when
        # done, so a worker that dies hands its task to another.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options=broker_transport_options(),
        broker_connection_retry_on_startup=True,
        # A worker whose broker went away (Redis restarted) keeps reconnecting
        # instead of exiting after 100 tries.
        broker_connection_max_retries=None,
        result_expires=3600,
        task_track_started=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def queue_prefix(celery_app: Celery) -> str:
    """The DELF_QUEUE_PREFIX an app of ``make_app`` was built with."""
    return celery_app.conf.delf_queue_prefix


app = make_app()


# --------------------------------------------------------------------------- request ids

task_log = logging.getLogger("delf.task")

HEADER_PREFIX = "delf_"  # message headers delf_request_id, delf_job_id, delf_image_id
_PROPAGATED = ("request_id", "job_id", "image_id")
_IMAGE_ID_TASKS = (INDEX_ADD, INDEX_GET, INDEX_FEATURES, INDEX_DELETE)


def ids_from_args(name: str, args, kwargs) -> dict[str, str]:
    """The job and image ids a task's arguments name (per docs/CONTRACTS.md)."""
    ids: dict[str, object] = {}
    args = list(args or ())
    kwargs = kwargs or {}
    try:
        if name in (INGEST_EXTRACT, INGEST_INDEX):
            first = args[0] if args else kwargs.get("item", kwargs.get("extracted"))
            ids["job_id"] = args[1] if len(args) > 1 else kwargs.get("job_id")
            ids["image_id"] = first.get("image_id") if isinstance(first, dict) else None
        elif name in _IMAGE_ID_TASKS:
            ids["image_id"] = args[0] if args else kwargs.get("image_id")
    except (IndexError, AttributeError, TypeError):
        pass
    return {k: v for k, v in ids.items() if isinstance(v, str) and v}


@signals.before_task_publish.connect(weak=False)
def _ids_to_headers(sender=None, body=None, headers=None, **_kwargs) -> None:
    """Every task published (by the gateway, or by a worker: the next step of a chain, a
    retry) carries the ids bound where it was sent."""
    if headers is None:
        return
    ids = logs.current()
    try:
        args, kwargs = body[0], body[1]  # protocol 2: (args, kwargs, embed)
    except (TypeError, IndexError, KeyError):
        args, kwargs = (), {}
    ids.update(ids_from_args(str(sender or headers.get("task") or ""), args, kwargs))
    for name in _PROPAGATED:
        if ids.get(name):
            headers[HEADER_PREFIX + name] = ids[name]


def ids_of_request(task, args=None, kwargs=None) -> dict[str, str]:
    """The ids a running task was sent with (message headers), else from its arguments."""
    request = getattr(task, "request", None)
    headers = getattr(request, "headers", None) or {}
    ids: dict[str, str] = {}
    for name in _PROPAGATED:
        value = getattr(request, HEADER_PREFIX + name, None) or headers.get(HEADER_PREFIX + name)
        if isinstance(value, str) and value:
            ids[name] = value
    for name, value in ids_from_args(getattr(task, "name", ""), args, kwargs).items():
        ids.setdefault(name, value)
    return ids


_running: dict[str, tuple[list, float]] = {}


def _outcome(retval) -> str:
    if isinstance(retval, dict) and retval.get("ok") is False:
        err = failure(retval, default_code="?", default_message="")
        return f"rejected ({err.code}: {err.message[:300]})"
    return "ok"


@signals.task_prerun.connect(weak=False)
def _task_started(task_id=None, task=None, args=None, kwargs=None, **_kwargs) -> None:
    ids = ids_of_request(task, args, kwargs)
    tokens = logs.bind(task_id=task_id, **ids)
    tracing.annotate(**ids)  # the task's span, when the instrumentation's receiver ran first
    if task_id:
        _running[task_id] = (tokens, time.monotonic())
    task_log.info("task %s started", getattr(task, "name", "?"), extra={"task": getattr(task, "name", "?")})


@signals.task_failure.connect(weak=False)
def _task_failed(task_id=None, exception=None, sender=None, **_kwargs) -> None:
    name = getattr(sender, "name", "?")
    task_log.error("task %s failed: %s: %s", name, type(exception).__name__, exception,
                   extra={"task": name, "outcome": "error"})


@signals.task_retry.connect(weak=False)
def _task_retried(request=None, reason=None, sender=None, **_kwargs) -> None:
    name = getattr(sender, "name", "?")
    task_log.warning("task %s will be retried: %s", name, reason, extra={"task": name, "outcome": "retry"})


@signals.task_postrun.connect(weak=False)
def _task_finished(task_id=None, task=None, retval=None, state=None, **_kwargs) -> None:
    tokens, began = _running.pop(task_id, ([], None))
    name = getattr(task, "name", "?")
    try:
        if state == "SUCCESS":
            seconds = time.monotonic() - began if began is not None else 0.0
            outcome = _outcome(retval)
            task_log.info("task %s finished in %.3f s: %s", name, seconds, outcome,
                          extra={"task": name, "outcome": outcome.split(" ")[0],
                                 "duration_s": round(seconds, 4)})
    finally:
        logs.unbind(tokens)


# --------------------------------------------------------------------------- worker logging

# The health names of the worker services (grpc.health.v1 on the gateway).
WORKER_SERVICES = {"extract": "extractor", "index": "indexer", "verify": "verifier"}


def worker_service_name(celery_app: Celery | None = None) -> str:
    """extractor, indexer or verifier, from the tasks this process registered."""
    registered = set((celery_app or app).tasks.keys())
    found = sorted({WORKER_SERVICES[ROUTES[t]] for t in registered if t in ROUTES})
    return "+".join(found) or "worker"


def _cli_loglevel() -> bool:
    """Whether the worker's command line names a log level (``-l``/``--loglevel``)."""
    return any(a == "--loglevel" or a.startswith("--loglevel=") or (a.startswith("-l") and not a.startswith("--"))
               for a in sys.argv[1:])


@signals.setup_logging.connect(weak=False)
def _setup_worker_logging(loglevel=None, **_kwargs) -> None:
    """Celery workers log like every service (delf_common.logs, DELF_LOG_FORMAT): the
    level is the command line's ``--loglevel`` when given, else DELF_LOG_LEVEL."""
    explicit = bool(loglevel) and _cli_loglevel()
    logs.setup(worker_service_name(), loglevel if explicit else None)
    if not explicit:
        # Celery's own per-task lines ("Task ... received", "... succeeded in") repeat the
        # delf.task lines, which carry the ids: keep only its warnings and errors.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(max(logging.getLogger().level, logging.WARNING))


@signals.worker_init.connect(weak=False)
def _start_tracing(sender=None, **_kwargs) -> None:
    """OpenTelemetry spans of this worker's tasks when DELF_TRACING asks (delf_common.tracing)."""
    tracing.setup(worker_service_name(getattr(sender, "app", None)))


@signals.worker_shutdown.connect(weak=False)
def _stop_tracing(**_kwargs) -> None:
    tracing.shutdown()


# --------------------------------------------------------------------------- heartbeats

# Checks a worker's heartbeat reports, by name ("milvus": the indexer registers one);
# each raises when its dependency cannot be reached.
HEARTBEAT_CHECKS: dict[str, Callable[[], None]] = {}
HEARTBEAT_TTL_INTERVALS = 3  # a heartbeat expires after this many intervals

heartbeat_log = logging.getLogger("delf.heartbeat")


def heartbeat_registry(prefix: str) -> str:
    """The Redis set that names every heartbeat key of this deployment (`prefix`: its
    DELF_QUEUE_PREFIX)."""
    return f"{prefix}:heartbeats"


def heartbeat_key(service: str, node: str, prefix: str) -> str:
    return f"{prefix}:heartbeat:{service}:{node}"


class Heartbeat:
    """Writes ``<prefix>:heartbeat:<service>:<node>`` every DELF_HEARTBEAT_S seconds, with a
    TTL of 3 intervals: JSON ``{service, node, host, pid, ts, checks: {name: {ok, error}}}``.
    The gateway reads them (grpc.health.v1): no live key, no worker of that service."""

    def __init__(self, services: list[str], node: str, interval: float | None = None,
                 checks: dict[str, Callable[[], None]] | None = None, prefix: str | None = None):
        self.services = services
        self.node = node
        self.prefix = prefix if prefix is not None else config.get("DELF_QUEUE_PREFIX")
        self.interval = float(interval if interval is not None else config.get("DELF_HEARTBEAT_S"))
        if self.interval <= 0:
            raise ValueError(f"a heartbeat interval must be positive, got {self.interval:g} s")
        self.ttl = max(1, int(round(self.interval * HEARTBEAT_TTL_INTERVALS + 0.499)))
        self.checks = HEARTBEAT_CHECKS if checks is None else checks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delf-heartbeat", daemon=True)
        self._executor = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="delf-check")
        self._pending: dict[str, futures.Future] = {}
        self._last: dict[str, dict] = {}
        self._redis = None

    def start(self) -> "Heartbeat":
        import redis

        self._redis = redis.Redis.from_url(config.get("DELF_REDIS_URL"), socket_connect_timeout=2,
                                           socket_timeout=2)
        self._thread.start()
        return self

    def _run_checks(self) -> dict[str, dict]:
        """Each check's latest result, waiting at most ~half an interval for a slow one."""
        budget = time.monotonic() + min(self.interval / 2, 5.0)
        for name, fn in self.checks.items():
            if name not in self._pending:
                self._pending[name] = self._executor.submit(fn)
        for name, future in list(self._pending.items()):
            try:
                future.result(timeout=max(budget - time.monotonic(), 0.0))
                self._last[name] = {"ok": True}
            except futures.TimeoutError:
                self._last.setdefault(name, {"ok": False, "error": "check did not finish yet"})
                continue  # still running: keep the last result, wait for it next round
            except Exception as exc:  # noqa: BLE001 - a failed check is what we report
                self._last[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            del self._pending[name]
        return dict(self._last)

    def beat(self) -> None:
        checks = self._run_checks() if not self._stop.is_set() else dict(self._last)
        for service in self.services:
            key = heartbeat_key(service, self.node, self.prefix)
            payload = json.dumps({"service": service, "node": self.node, "host": socket.gethostname(),
                                  "pid": os.getpid(), "ts": time.time(), "checks": checks})
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(key, payload, ex=self.ttl)
            pipe.sadd(heartbeat_registry(self.prefix), key)
            pipe.execute()
        for name, result in checks.items():
            previous = getattr(self, "_reported", {}).get(name)
            if previous is None or previous != result["ok"]:
                if result["ok"]:
                    heartbeat_log.info("heartbeat: %s reachable", name)
                else:
                    heartbeat_log.warning("heartbeat: %s unreachable: %s", name, result.get("error"))
        self._reported = {name: r["ok"] for name, r in checks.items()}

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.beat()
                if failing:
                    heartbeat_log.info("heartbeat: writing to Redis again")
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis away: keep trying
                if not failing:
                    heartbeat_log.warning("heartbeat: cannot write to Redis: %s", exc)
                failing = True
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and remove the keys (a warm shutdown is seen at once)."""
        self._stop.set()
        self._thread.join(timeout)
        for future in self._pending.values():
            future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._redis is not None:
            try:
                keys = [heartbeat_key(s, self.node, self.prefix) for s in self.services]
                self._redis.delete(*keys)
                self._redis.srem(heartbeat_registry(self.prefix), *keys)
            except Exception:  # noqa: BLE001 - Redis away: the keys expire anyway
                pass
            self._redis.close()


def read_heartbeats(client, prefix: str) -> dict[str, list[dict]]:
    """The live heartbeats of the deployment of DELF_QUEUE_PREFIX `prefix`'s workers, by
    service (extractor, indexer, verifier); forgets the keys that expired. `client`: a
    redis.Redis (errors propagate)."""
    registry = heartbeat_registry(prefix)
    keys = sorted(client.smembers(registry))
    if not keys:
        return {}
    values = client.mget(keys)
    dead = [k for k, v in zip(keys, values) if v is None]
    if dead:
        client.srem(registry, *dead)
    out: dict[str, list[dict]] = {}
    for value in values:
        if value is None:
            continue
        try:
            beat = json.loads(value)
            service = beat["service"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(service, str):
            out.setdefault(service, []).append(beat)
    return out


_heartbeat: Heartbeat | None = None


def worker_services(consumer) -> list[str]:
    """The services whose queues a worker consumes (extractor, indexer, verifier)."""
    prefix = queue_prefix(consumer.app)
    names = {queue_name(s, prefix): s for s in SERVICES}
    try:
        consumed = list(consumer.app.amqp.queues.consume_from or consumer.app.amqp.queues)
    except AttributeError:
        consumed = []
    found = [WORKER_SERVICES[names[q]] for q in consumed if q in names]
    if not found:
        found = [n for n in worker_service_name(consumer.app).split("+") if n in WORKER_SERVICES.values()]
    return sorted(set(found))


@signals.worker_ready.connect(weak=False)
def _start_heartbeat(sender=None, **_kwargs) -> None:
    global _heartbeat
    if _heartbeat is not None or sender is None:
        return
    services = worker_services(sender)
    if not services:
        return
    node = getattr(sender, "hostname", None) or f"{socket.gethostname()}-{os.getpid()}"
    _heartbeat = Heartbeat(services, str(node), prefix=queue_prefix(sender.app)).start()
    heartbeat_log.info("heartbeat every %.1f s for %s as %s", _heartbeat.interval, ", ".join(services), node)


@signals.worker_shutdown.connect(weak=False)
def _stop_heartbeat(**_kwargs) -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None
