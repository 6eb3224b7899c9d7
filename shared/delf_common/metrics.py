"""Prometheus metrics of every service, served on ``/metrics`` when DELF_METRICS_PORT is set.

The gateway counts its calls by method and gRPC status code and samples the queue
depths; the workers count their tasks by name and outcome (``ok``, ``rejected``: the
task answered an error such as bad input, ``error``: it raised) and time them; the
indexer counts the descriptors it adds.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from delf_common import config

log = logging.getLogger("delf.metrics")

GATEWAY_REQUESTS = Counter(
    "delf_gateway_requests", "gRPC calls answered by the gateway, by method and status code.",
    ["method", "code"],
)
GATEWAY_LATENCY = Histogram(
    "delf_gateway_request_seconds", "Time the gateway took to answer a call, by method.",
    ["method"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
QUEUE_DEPTH = Gauge(
    "delf_queue_depth", "Tasks waiting in each service's queue (sampled by the gateway).", ["queue"],
)
BACKPRESSURE_REFUSALS = Counter(
    "delf_gateway_backpressure", "Calls refused or slowed down because a queue held DELF_MAX_QUEUE tasks.",
    ["queue", "action"],
)
WORKER_TASKS = Counter(
    "delf_worker_tasks", "Tasks a worker finished, by task name and outcome (ok, rejected, error).",
    ["task", "outcome"],
)
WORKER_TASK_SECONDS = Histogram(
    "delf_worker_task_seconds", "Time a worker spent on a task, by task name.",
    ["task"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
DESCRIPTORS_INDEXED = Counter(
    "delf_descriptors_indexed", "Descriptors the indexer added to Milvus.",
)

_started_port: int | None = None
_hooks_installed = False


def start_server(port: int | None = None) -> int | None:
    """Serve /metrics on DELF_METRICS_PORT (0: off). Returns the port, or None when off."""
    global _started_port
    port = config.get("DELF_METRICS_PORT") if port is None else port
    if not port:
        return None
    if _started_port is not None:
        return _started_port
    start_http_server(int(port))
    _started_port = int(port)
    log.info("metrics on http://0.0.0.0:%d/metrics", int(port))
    return _started_port


def outcome(result) -> str:
    """ok / rejected (an error answer, e.g. bad input) for a task's return value."""
    if isinstance(result, dict) and result.get("ok") is False:
        return "rejected"
    return "ok"


def install_worker_hooks() -> None:
    """Count and time every task of this worker; start /metrics when the worker starts.

    Called by each worker's task module. The HTTP server starts, once per process,
    where the tasks run: in worker_process_init (solo pool: the worker's one process;
    prefork: a child - the first child binds the port, so with --concurrency above 1
    /metrics shows that child's tasks only), or in worker_init for the thread-based
    pools, which send no worker_process_init.
    """
    global _hooks_installed
    if _hooks_installed:  # several task modules in one process (tests, eager mode)
        return
    _hooks_installed = True
    from celery import signals

    starts: dict[str, float] = {}

    def _start(**_kwargs) -> None:
        try:
            start_server()
        except OSError as exc:  # prefork: another child holds the port
            log.info("metrics server not started in this process: %s", exc)

    def _start_threaded(sender=None, **_kwargs) -> None:
        pool = getattr(sender, "pool_cls", "")
        pool = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if any(kind in pool for kind in ("thread", "gevent", "eventlet")):
            _start()

    def _prerun(task_id=None, **_kwargs) -> None:
        if task_id:
            starts[task_id] = time.monotonic()

    def _postrun(task_id=None, task=None, retval=None, state=None, **_kwargs) -> None:
        name = getattr(task, "name", "unknown")
        began = starts.pop(task_id, None)
        if began is not None:
            WORKER_TASK_SECONDS.labels(name).observe(time.monotonic() - began)
        if state == "SUCCESS":
            WORKER_TASKS.labels(name, outcome(retval)).inc()
        elif state == "FAILURE":
            WORKER_TASKS.labels(name, "error").inc()
        # RETRY: counted when the retried task finishes

    signals.worker_init.connect(_start_threaded, weak=False)
    signals.worker_process_init.connect(_start, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
