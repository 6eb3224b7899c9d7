"""The Celery application every service shares: broker, serialization, routing.

Each worker service imports this app and registers only its own tasks; the
gateway sends tasks by name (`send_task`) and never imports torch or Milvus.
Messages are msgpack (binary-safe, never pickle).
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from delf_common import config

# Task names: the contract between the gateway and the workers.
EXTRACT = "delf.extract"                  # (image: bytes|None, options: dict) -> features wire
INGEST_EXTRACT = "delf.ingest.extract"    # (item: dict, job_id) -> dict for INGEST_INDEX
INDEX_ADD = "delf.index.add"              # (image_id, features wire, metadata) -> image info
INGEST_INDEX = "delf.ingest.index"        # (extract result, job_id) -> None (records job progress)
INDEX_SEARCH = "delf.index.search"        # (features wire, shortlist) -> candidates
INDEX_GET = "delf.index.get"              # (image_id) -> image info | error
INDEX_FEATURES = "delf.index.features"    # (image_id) -> features wire | error
INDEX_DELETE = "delf.index.delete"        # (image_id) -> {"descriptors_removed"} | error
INDEX_STATS = "delf.index.stats"          # () -> {"images", "descriptors", "pca_id"}
VERIFY = "delf.verify"                    # (query, candidates) -> verified matches

SERVICES = ("extract", "index", "verify")

_ROUTES = {
    EXTRACT: "extract",
    INGEST_EXTRACT: "extract",
    INDEX_ADD: "index",
    INGEST_INDEX: "index",
    INDEX_SEARCH: "index",
    INDEX_GET: "index",
    INDEX_FEATURES: "index",
    INDEX_DELETE: "index",
    INDEX_STATS: "index",
    VERIFY: "verify",
}


def queue_name(service: str) -> str:
    """The Redis list a service's workers consume, e.g. ``delf.extract``."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {SERVICES}")
    return f"{config.get('DELF_QUEUE_PREFIX')}.{service}"


def queue_for_task(task_name: str) -> str:
    return queue_name(_ROUTES[task_name])


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
    url = config.get("DELF_REDIS_URL")
    app = Celery(name, broker=url, backend=url)
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack", "json"],
        result_accept_content=["msgpack", "json"],
        task_routes={task: {"queue": queue_for_task(task)} for task in _ROUTES},
        task_queues=[Queue(queue_name(s)) for s in SERVICES],
        task_default_queue=queue_name("extract"),
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


app = make_app()
