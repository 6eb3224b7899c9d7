"""Prometheus metrics of every service, served on ``/metrics`` when DELF_METRICS_PORT is set.

The gateway counts its calls by method and gRPC status code and samples the queue
depths and the workers with a live heartbeat; the workers count their tasks by name and
outcome (``ok``, ``rejected``: the task answered an error such as bad input, ``error``:
it raised), their failures by reason (the error code, or the exception's type) and time
them; whoever records an ingest item's progress in its job counts it (received, done,
failed); the indexer counts the descriptors it adds and reports the images and
descriptors stored. deploy/grafana/dashboards/delf.json charts them (docs/DEPLOYMENT.md).

A Celery worker counts in prometheus_client's multiprocess mode: each process (the
worker's main process and every child of a prefork pool) writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless that variable is set), and
the main process serves the sum of all of them, so ``/metrics`` shows every child's tasks.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time


def _is_celery_worker(argv: list[str]) -> bool:
    """Whether this process is ``celery ... worker`` (or ``python -m celery ... worker``)."""
    if not argv:
        return False
    program = argv[0].replace("\\", "/")
    is_celery = os.path.basename(program) in ("celery", "celery.exe") or program.endswith("celery/__main__.py")
    return is_celery and "worker" in argv[1:]


def _multiprocess_setup() -> tuple[str | None, bool]:
    """(PROMETHEUS_MULTIPROC_DIR, created by us) for a Celery worker that serves metrics.

    Must run before prometheus_client is imported: the value class is chosen then, and
    prefork children inherit it."""
    existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if existing:
        return existing, False
    if not _is_celery_worker(sys.argv):
        return None, False
    try:
        from delf_common import config as _config

        if not _config.get("DELF_METRICS_PORT"):
            return None, False
    except Exception:  # noqa: BLE001 - a bad setting is reported where it is used
        return None, False
    path = tempfile.mkdtemp(prefix="delf-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, True


MULTIPROC_DIR, _OWN_MULTIPROC_DIR = _multiprocess_setup()

from prometheus_client import (  # noqa: E402 - after the multiprocess setup above
    CollectorRegistry, Counter, Gauge, Histogram, start_http_server,
)

from delf_common import config  # noqa: E402 - after the sys.path / environment setup above

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
WORKER_FAILURES = Counter(
    "delf_worker_failures", "Tasks that did not succeed, by task name and reason: the error code of a "
    "rejected task (e.g. INVALID_ARGUMENT), the exception type of one that raised.",
    ["task", "reason"],
)
DESCRIPTORS_INDEXED = Counter(
    "delf_descriptors_indexed", "Descriptors the indexer added to Milvus.",
)
INGEST_ITEMS = Counter(
    "delf_ingest_items", "Ingest job items by step: received (recorded in its job by the gateway), "
    "done (indexed), failed (refused or failed at any step).",
    ["outcome"],
)
LIVE_WORKERS = Gauge(
    "delf_live_workers", "Workers with a live heartbeat in Redis, by kind: extractor, indexer, verifier "
    "(read by the gateway; the label is not `service`, which scrape configs give the target).",
    ["worker"], multiprocess_mode="livemax",
)
STORED = Gauge(
    "delf_index_stored", "What the index holds (images, descriptors), as an indexer last counted it.",
    ["what"], multiprocess_mode="livemax",
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
    if MULTIPROC_DIR:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROC_DIR)
        start_http_server(int(port), registry=registry)
    else:
        start_http_server(int(port))
    _started_port = int(port)
    log.info("metrics on http://0.0.0.0:%d/metrics%s", int(port),
             " (all processes of this worker)" if MULTIPROC_DIR else "")
    return _started_port


def outcome(result) -> str:
    """ok / rejected (an error answer, e.g. bad input) for a task's return value."""
    if isinstance(result, dict) and result.get("ok") is False:
        return "rejected"
    return "ok"


def rejection_code(result) -> str:
    """The error code of a rejected task's answer (``{"ok": False, "error": {"code": ...}}``)."""
    err = result.get("error") if isinstance(result, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return str(code)[:64] if code else "UNKNOWN"


def _start_here(**_kwargs) -> None:
    try:
        start_server()
    except OSError as exc:  # prefork: another child holds the port
        log.info("metrics server not started in this process: %s", exc)


def _start_in_main(sender=None, **_kwargs) -> None:
    """worker_init: the main process serves every process's samples (multiprocess mode),
    or the tasks' own when they run in its threads."""
    if MULTIPROC_DIR:
        _start_here()
        return
    pool = getattr(sender, "pool_cls", "")
    pool = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if any(kind in pool for kind in ("thread", "gevent", "eventlet")):
        _start_here()


def _start_in_child(**_kwargs) -> None:
    """worker_process_init: without multiprocess mode, /metrics starts where the tasks run."""
    if not MULTIPROC_DIR:
        _start_here()


def _child_exit(pid=None, **_kwargs) -> None:
    if MULTIPROC_DIR:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), MULTIPROC_DIR)


def _main_exit(**_kwargs) -> None:
    if MULTIPROC_DIR and _OWN_MULTIPROC_DIR:
        shutil.rmtree(MULTIPROC_DIR, ignore_errors=True)


_task_starts: dict[str, float] = {}  # task id -> when it started (time.monotonic)


def _task_prerun(task_id=None, **_kwargs) -> None:
    if task_id:
        _task_starts[task_id] = time.monotonic()


def _task_postrun(task_id=None, task=None, retval=None, state=None, **_kwargs) -> None:
    name = getattr(task, "name", "unknown")
    began = _task_starts.pop(task_id, None)
    if began is not None:
        WORKER_TASK_SECONDS.labels(name).observe(time.monotonic() - began)
    if state == "SUCCESS":
        result = outcome(retval)
        WORKER_TASKS.labels(name, result).inc()
        if result == "rejected":
            WORKER_FAILURES.labels(name, rejection_code(retval)).inc()
    elif state == "FAILURE":
        WORKER_TASKS.labels(name, "error").inc()
        WORKER_FAILURES.labels(name, type(retval).__name__ if isinstance(retval, BaseException) else "error").inc()
    # RETRY: counted when the retried task finishes


def install_worker_hooks() -> None:
    """Count and time every task of this worker; start /metrics when the worker starts.

    Called by each worker's task module. In a ``celery worker`` process (multiprocess
    mode, see the module doc) the HTTP server starts in the main process at worker_init
    and serves every process's samples, prefork children included. Otherwise (a worker
    started some other way, without PROMETHEUS_MULTIPROC_DIR) it starts where the tasks
    run: in worker_process_init (solo pool; prefork: the first child binds the port, so
    /metrics shows that child's tasks only), or in worker_init for thread-based pools.
    """
    global _hooks_installed
    if _hooks_installed:  # several task modules in one process (tests, eager mode)
        return
    _hooks_installed = True
    from celery import signals

    signals.worker_init.connect(_start_in_main, weak=False)
    signals.worker_process_init.connect(_start_in_child, weak=False)
    signals.worker_process_shutdown.connect(_child_exit, weak=False)
    signals.worker_shutdown.connect(_main_exit, weak=False)
    signals.task_prerun.connect(_task_prerun, weak=False)
    signals.task_postrun.connect(_task_postrun, weak=False)
