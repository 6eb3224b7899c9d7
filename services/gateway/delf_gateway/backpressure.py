"""Backpressure: sending work to the workers without overrunning them or the caller.

`WorkerCalls` is the base of the gateway's servicer (delf_gateway.server.Gateway): every
RPC sends its Celery tasks and awaits their answers through it, within the caller's
deadline, and asks it for admission first. A queue holding DELF_MAX_QUEUE tasks refuses
new calls at once (RESOURCE_EXHAUSTED) and slows an ingest stream down instead of piling
photos up in Redis; DELF_MAX_SEARCHES bounds the searches one gateway runs at a time.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import grpc
import redis
from celery.exceptions import TimeoutError as CeleryTimeout

from delf_common import celery_app
from delf_common import contract
from delf_common import metrics
from delf_common.jobs import JobStore
from delf_gateway.checks import RequestError, status_code
from delf_gateway.settings import GatewaySettings

# Time kept back from the caller's deadline to build and send the answer.
DEADLINE_MARGIN_S = 0.2
# How often a stream that waits for room in a full queue looks again.
QUEUE_POLL_S = 0.2


class WorkerCalls:
    """Task sending, waiting and admission shared by the search and ingest RPCs."""

    def __init__(self, app=None, jobs: JobStore | None = None, settings: GatewaySettings | None = None):
        self.app = app or celery_app.app
        # The gateway's settings, read once: here when none are given (tests build a servicer).
        self.settings = settings or GatewaySettings.from_env()
        self.jobs = jobs or JobStore(timings=self.settings.job_timings)
        self.default_timeout = self.settings.task_timeout_s
        self.max_queue = self.settings.max_queue
        self.max_searches = self.settings.max_searches
        self.queue_prefix = self.settings.queue_prefix
        self._search_slots = threading.BoundedSemaphore(self.max_searches) if self.max_searches > 0 else None

    # -- calls within the caller's deadline ---------------------------------------

    def _budget(self, context) -> float:
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.default_timeout
        return max(min(remaining - DEADLINE_MARGIN_S, self.default_timeout), 0.01)

    def _send(self, name: str, *args, context=None):
        # A task whose caller has given up is dropped by the worker unrun (Celery's
        # `expires`): under overload, workers spend no time on answers nobody awaits.
        expires = self._budget(context) + DEADLINE_MARGIN_S if context is not None else None
        return self.app.send_task(name, args=list(args), queue=self._queue_for(name), expires=expires)

    def _queue_for(self, task_name: str) -> str:
        """The queue a task is sent to, under this gateway's DELF_QUEUE_PREFIX."""
        return contract.queue_for_task(task_name, self.queue_prefix)

    def _wait(self, result, context, what: str) -> dict:
        try:
            reply = result.get(timeout=self._budget(context), disable_sync_subtasks=False)
        except CeleryTimeout:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the {what} workers did not answer in time (are they running? queue depths: "
                f"{self._queue_depths()})",
            ) from None
        failed = contract.failure(reply, default_message=f"{what} failed")
        if failed is not None:
            raise RequestError(status_code(failed.code), failed.message)
        return reply

    def _call(self, name: str, *args, context=None, what: str) -> dict:
        return self._wait(self._send(name, *args, context=context), context, what)

    # -- queue limits ---------------------------------------------------------------

    def _queue_depths(self) -> dict[str, int]:
        client = self.jobs.redis
        try:
            return {s: int(client.llen(contract.queue_name(s, self.queue_prefix))) for s in contract.SERVICES}
        except redis.RedisError:
            return {}

    def _full_queue(self, services) -> tuple[str, int] | None:
        """The first of `services` whose queue holds DELF_MAX_QUEUE tasks or more, and its depth."""
        if self.max_queue <= 0:
            return None
        client = self.jobs.redis
        for service in services:
            depth = int(client.llen(contract.queue_name(service, self.queue_prefix)))
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

    # -- searches at a time -----------------------------------------------------------

    @contextmanager
    def _search_slot(self):
        """Holds one of DELF_MAX_SEARCHES slots for the block; RESOURCE_EXHAUSTED at once
        when this gateway already runs that many searches."""
        slots = self._search_slots
        if slots is not None and not slots.acquire(blocking=False):
            metrics.BACKPRESSURE_REFUSALS.labels("search", "refused").inc()
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this gateway is already working on {self.max_searches} searches (limit "
                f"DELF_MAX_SEARCHES={self.max_searches}); the system is overloaded, retry later",
            )
        try:
            yield
        finally:
            if slots is not None:
                slots.release()
