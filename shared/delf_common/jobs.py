"""Bulk ingestion jobs, kept in Redis so that any gateway can answer for them.

A job is a hash (state, total, timestamps) plus a set of finished item ids and
a hash of failed item ids -> reason. Marking an item is idempotent (a set add),
so a task delivered twice never counts twice; `done + failed == total` ends the job.
"""
from __future__ import annotations

import dataclasses
import time
import uuid

import redis

from delf_common import config

RECEIVING = "RECEIVING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
CANCELLED = "CANCELLED"
TERMINAL = {COMPLETED, CANCELLED}

# How long a finished job's record is kept.
JOB_TTL_S = 7 * 24 * 3600
MAX_ERRORS_REPORTED = 1000


@dataclasses.dataclass
class JobStatus:
    job_id: str
    state: str
    total: int
    done: int
    failed: int
    errors: list[tuple[str, str]]
    created_at: float
    updated_at: float

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        elapsed = max(self.updated_at - self.created_at, 1e-6)
        return self.finished / elapsed if self.finished else 0.0

    @property
    def eta_s(self) -> float:
        if self.state != RUNNING or not self.rate:
            return 0.0
        return max(self.total - self.finished, 0) / self.rate


class JobStore:
    def __init__(self, client: redis.Redis | None = None):
        # Timeouts: a Redis host that vanishes without closing connections must turn
        # into an error (UNAVAILABLE at the gateway), not a hung call.
        self.redis = client or redis.Redis.from_url(
            config.get("DELF_REDIS_URL"), socket_connect_timeout=5, socket_timeout=10,
            health_check_interval=30,
        )
        self.prefix = f"{config.get('DELF_QUEUE_PREFIX')}:job:"

    def _keys(self, job_id: str) -> tuple[str, str, str]:
        base = self.prefix + job_id
        return base, base + ":done", base + ":failed"

    def create(self) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        key, _, _ = self._keys(job_id)
        self.redis.hset(key, mapping={"state": RECEIVING, "total": 0, "created_at": now, "updated_at": now})
        self.redis.expire(key, JOB_TTL_S)
        return job_id

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._keys(job_id)[0]))

    def set_total(self, job_id: str, total: int) -> None:
        """The client finished streaming: the job now knows its size."""
        key, _, _ = self._keys(job_id)
        mapping = {"total": total, "updated_at": time.time()}
        if not self.is_cancelled(job_id):  # a job cancelled mid-stream stays cancelled
            mapping["state"] = RUNNING
        self.redis.hset(key, mapping=mapping)
        self._maybe_complete(job_id)

    def mark_done(self, job_id: str, item_id: str) -> None:
        key, done, failed = self._keys(job_id)
        pipe = self.redis.pipeline()
        pipe.sadd(done, item_id)
        pipe.hdel(failed, item_id)  # a retried item that now succeeded
        pipe.hset(key, "updated_at", time.time())
        for k in (done, failed):
            pipe.expire(k, JOB_TTL_S)
        pipe.execute()
        self._maybe_complete(job_id)

    def mark_failed(self, job_id: str, item_id: str, reason: str) -> None:
        key, done, failed = self._keys(job_id)
        if self.redis.sismember(done, item_id):
            return
        pipe = self.redis.pipeline()
        pipe.hset(failed, item_id, reason[:500])
        pipe.hset(key, "updated_at", time.time())
        pipe.expire(failed, JOB_TTL_S)
        pipe.execute()
        self._maybe_complete(job_id)

    def cancel(self, job_id: str) -> None:
        key, _, _ = self._keys(job_id)
        self.redis.hset(key, mapping={"state": CANCELLED, "updated_at": time.time()})

    def is_cancelled(self, job_id: str) -> bool:
        return self.redis.hget(self._keys(job_id)[0], "state") == CANCELLED.encode()

    def _maybe_complete(self, job_id: str) -> None:
        status = self.get(job_id)
        if status and status.state == RUNNING and status.finished >= status.total:
            self.redis.hset(self._keys(job_id)[0], "state", COMPLETED)

    def get(self, job_id: str) -> JobStatus | None:
        key, done, failed = self._keys(job_id)
        pipe = self.redis.pipeline()
        pipe.hgetall(key)
        pipe.scard(done)
        pipe.hlen(failed)
        pipe.hscan(failed, count=MAX_ERRORS_REPORTED)
        fields, n_done, n_failed, (_, errors) = pipe.execute()
        if not fields:
            return None
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return JobStatus(
            job_id=job_id,
            state=f["state"],
            total=int(f["total"]),
            done=int(n_done),
            failed=int(n_failed),
            errors=sorted((k.decode(), v.decode()) for k, v in errors.items()),
            created_at=float(f["created_at"]),
            updated_at=float(f["updated_at"]),
        )
