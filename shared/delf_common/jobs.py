"""Bulk ingestion jobs, kept in Redis so that any gateway can answer for them.

A job is a hash (state, total, timestamps) plus a set of finished item ids and
a hash of failed item ids -> reason. Marking an item is idempotent (a set add),
so a task delivered twice never counts twice; `done + failed == total` ends the job.

Every item the gateway receives is also recorded (``:items``, item id -> JSON of its
metadata and location; bytes items are recorded without their photo), so that a job
whose messages were lost (a worker killed between Redis' BRPOP and kombu's unacked
record, a gateway restarted mid-stream, a client that went away) can be resumed:
items neither done nor failed are sent again (``unfinished``). `total` is the number
of recorded items.

An extracted item waits in ``:extracted`` (id -> msgpack of its metadata, features and
thumbnail)
until the index step has recorded it: the index message carries only its id (a claim
check, `delf_common.parked`), so a lost index message is re-sent from Redis, never
extracted again.
"""
from __future__ import annotations

import dataclasses
import json
import time

import msgpack
import redis

from delf_common import config, metrics
from delf_common.contract import is_job_id, new_job_id

RECEIVING = "RECEIVING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
CANCELLED = "CANCELLED"
TERMINAL = {COMPLETED, CANCELLED}
CANCELLED_REASON = "job cancelled"  # what workers record for items skipped by a cancelled job

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
    # No progress for DELF_JOB_STALLED_AFTER_S (RUNNING: nothing finished; RECEIVING: nothing
    # received); `hint` (filled by JobStore.get(explain=True)) says what to do.
    idle_s: float = 0.0
    stalled: bool = False
    hint: str = ""
    # Done items that were not extracted again (same id, bytes and metadata), and done
    # items whose bytes another id holds (item -> that id; `duplicates_skipped` of them
    # were not indexed: DELF_DUPLICATES=skip).
    unchanged: int = 0
    duplicates: int = 0
    duplicates_skipped: int = 0
    duplicate_of: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        elapsed = max(self.updated_at - self.created_at, 1e-6)
        return self.finished / elapsed if self.finished else 0.0

    @property
    def eta_s(self) -> float:
        if self.state != RUNNING or not self.rate or self.stalled:
            return 0.0
        return max(self.total - self.finished, 0) / self.rate


@dataclasses.dataclass(frozen=True)
class JobTimings:
    """When a job counts as stalled (``stalled_after_s``, DELF_JOB_STALLED_AFTER_S), and what a
    stalled job's hint says about redelivery (``visibility_timeout_s``,
    DELF_VISIBILITY_TIMEOUT_S) and the gateway's own resume (``resume_after_s``,
    DELF_JOB_RESUME_AFTER_S; 0: never). Read once, when a `JobStore` is built."""

    stalled_after_s: float
    resume_after_s: float
    visibility_timeout_s: float

    @classmethod
    def from_env(cls) -> "JobTimings":
        """From the environment; a bad value counts as its default here (the gateway refuses
        it when it starts; a worker marking an item never fails on it)."""
        def read(name: str) -> float:
            try:
                return float(config.get(name))
            except config.ConfigError:
                return float(config.SETTINGS[name].default)

        return cls(stalled_after_s=read("DELF_JOB_STALLED_AFTER_S"), resume_after_s=read("DELF_JOB_RESUME_AFTER_S"),
                   visibility_timeout_s=read("DELF_VISIBILITY_TIMEOUT_S"))


class JobStore:
    def __init__(self, client: redis.Redis | None = None, timings: JobTimings | None = None):
        # Timeouts: a Redis host that vanishes without closing connections must turn
        # into an error (UNAVAILABLE at the gateway), not a hung call.
        self.redis = client or redis.Redis.from_url(
            config.get("DELF_REDIS_URL"), socket_connect_timeout=5, socket_timeout=10,
            health_check_interval=30,
        )
        self.prefix = f"{config.get('DELF_QUEUE_PREFIX')}:job:"
        self.timings = timings if timings is not None else JobTimings.from_env()

    def _keys(self, job_id: str) -> tuple[str, str, str]:
        base = self.prefix + job_id
        return base, base + ":done", base + ":failed"

    def _items_key(self, job_id: str) -> str:
        return self.prefix + job_id + ":items"

    def _extracted_key(self, job_id: str) -> str:
        return self.prefix + job_id + ":extracted"

    def create(self) -> str:
        job_id = new_job_id()
        now = time.time()
        key, _, _ = self._keys(job_id)
        self.redis.hset(key, mapping={"state": RECEIVING, "total": 0, "created_at": now, "updated_at": now})
        self.redis.expire(key, JOB_TTL_S)
        return job_id

    def exists(self, job_id: str) -> bool:
        if not is_job_id(job_id):  # never reaches a Redis key (delf_common.contract)
            return False
        return bool(self.redis.exists(self._keys(job_id)[0]))

    def set_total(self, job_id: str, total: int) -> None:
        """The client finished streaming: the job now knows its size."""
        key, _, _ = self._keys(job_id)
        mapping = {"total": total, "updated_at": time.time()}
        if not self.is_cancelled(job_id):  # a job cancelled mid-stream stays cancelled
            mapping["state"] = RUNNING
        self.redis.hset(key, mapping=mapping)
        self._maybe_complete(job_id)

    def _outcome_keys(self, job_id: str) -> tuple[str, str, str]:
        """The job's unchanged items (set), duplicates (item -> other id) and skipped duplicates (set)."""
        base = self.prefix + job_id
        return base + ":unchanged", base + ":duplicates", base + ":dupskipped"

    def mark_done(self, job_id: str, item_id: str, unchanged: bool = False, duplicate_of: str = "",
                  skipped: bool = False) -> bool:
        """The item is finished well; `unchanged`: without extraction (same id, bytes and
        metadata indexed); `duplicate_of`: its bytes are another id's (`skipped`: not indexed).
        True when this completed the job."""
        key, done, failed = self._keys(job_id)
        same, dups, dupskipped = self._outcome_keys(job_id)
        pipe = self.redis.pipeline()
        pipe.sadd(done, item_id)
        for k, wanted in ((same, unchanged), (dupskipped, skipped and duplicate_of)):
            if wanted:
                pipe.sadd(k, item_id)
                pipe.expire(k, JOB_TTL_S)
        if duplicate_of:
            pipe.hset(dups, item_id, duplicate_of)
            pipe.expire(dups, JOB_TTL_S)
        pipe.hdel(failed, item_id)  # a retried item that now succeeded
        pipe.hset(key, "updated_at", time.time())
        for k in (done, failed):
            pipe.expire(k, JOB_TTL_S)
        pipe.execute()
        metrics.INGEST_ITEMS.labels("done").inc()
        return self._maybe_complete(job_id)

    def mark_failed(self, job_id: str, item_id: str, reason: str) -> None:
        key, done, failed = self._keys(job_id)
        if self.redis.sismember(done, item_id):
            return
        pipe = self.redis.pipeline()
        pipe.hset(failed, item_id, reason[:500])
        pipe.hset(key, "updated_at", time.time())
        pipe.expire(failed, JOB_TTL_S)
        pipe.execute()
        metrics.INGEST_ITEMS.labels("failed").inc()
        self._maybe_complete(job_id)

    def cancel(self, job_id: str, interrupted: bool = False) -> None:
        """CANCELLED. `interrupted`: the client's stream broke (not a person's CancelJob), so
        the job may be resumed; an explicit cancel is final (and clears that mark)."""
        key, _, _ = self._keys(job_id)
        if interrupted and self.is_cancelled(job_id):
            return  # cancelled by a person first: stays final
        mapping = {"state": CANCELLED, "updated_at": time.time()}
        if interrupted:
            mapping["interrupted"] = 1
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=mapping)
        if not interrupted:
            pipe.hdel(key, "interrupted")
            pipe.delete(self._extracted_key(job_id))  # final: its index steps only record "job cancelled"
        pipe.execute()

    def is_interrupted(self, job_id: str) -> bool:
        return self.redis.hget(self._keys(job_id)[0], "interrupted") == b"1"

    # -- items (for resume) ----------------------------------------------------

    def record_item(self, job_id: str, item_id: str, metadata: dict | None = None,
                    location: str | None = None, refused: bool = False) -> None:
        """Remembers one received item: its metadata and location (None for bytes items).
        Also the time of the stream's last item (a stream still alive cannot be resumed)."""
        record = {"m": metadata or {}, "l": location}
        if refused:
            record["r"] = 1
        items = self._items_key(job_id)
        pipe = self.redis.pipeline()
        pipe.hset(items, item_id, json.dumps(record, separators=(",", ":")))
        pipe.expire(items, JOB_TTL_S)
        pipe.hset(self._keys(job_id)[0], "received_at", time.time())
        pipe.execute()
        metrics.INGEST_ITEMS.labels("received").inc()

    def recorded(self, job_id: str) -> int:
        return int(self.redis.hlen(self._items_key(job_id)))

    def is_finished(self, job_id: str, item_id: str) -> bool:
        _, done, failed = self._keys(job_id)
        pipe = self.redis.pipeline()
        pipe.sismember(done, item_id)
        pipe.hexists(failed, item_id)
        return any(pipe.execute())

    def unfinished(self, job_id: str) -> dict[str, dict]:
        """Recorded items neither done nor failed: id -> {"metadata", "location" (None: bytes)}."""
        _, done, failed = self._keys(job_id)
        finished = {m.decode() for m in self.redis.smembers(done)}
        finished.update(k.decode() for k in self.redis.hkeys(failed))
        out: dict[str, dict] = {}
        for raw_id, raw in self.redis.hscan_iter(self._items_key(job_id), count=1000):
            item_id = raw_id.decode()
            if item_id in finished:
                continue
            record = json.loads(raw)
            if record.get("r"):
                continue  # refused at the gateway: failed, never dispatched
            out[item_id] = {"metadata": record.get("m") or {}, "location": record.get("l")}
        return out

    def stream_idle_s(self, job_id: str) -> float:
        """Seconds since the last item of a stream arrived (or since the job was created)."""
        fields = self.redis.hmget(self._keys(job_id)[0], "received_at", "created_at")
        last = max(float(v) for v in fields if v is not None) if any(fields) else 0.0
        return time.time() - last

    def reopen(self, job_id: str, receiving: bool) -> int:
        """Before a resume: RECEIVING (a stream will add items) or RUNNING; items of an
        interrupted job that its cancellation skipped ("job cancelled") become unfinished
        again. Returns how many such items were reopened."""
        key, _, failed = self._keys(job_id)
        reopened = 0
        if self.is_interrupted(job_id) or not self.is_cancelled(job_id):
            stale = [k for k, v in self.redis.hscan_iter(failed, count=1000) if v.decode() == CANCELLED_REASON]
            if stale:
                reopened = int(self.redis.hdel(failed, *stale))
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"state": RECEIVING if receiving else RUNNING, "updated_at": time.time(),
                                "total": self.recorded(job_id)})
        pipe.hdel(key, "interrupted")
        pipe.execute()
        return reopened

    # -- extracted items (claim check, delf_common.parked) ----------------------

    def park(self, job_id: str, item_id: str, extracted: dict) -> None:
        """Keeps an extracted item (`{"metadata", "features", "thumbnail"?}`, the index step's
        payload) until its index step is done."""
        key = self._extracted_key(job_id)
        pipe = self.redis.pipeline()
        pipe.hset(key, item_id, msgpack.packb(extracted, use_bin_type=True))
        pipe.expire(key, JOB_TTL_S)
        pipe.execute()

    def parked(self, job_id: str, item_id: str) -> dict | None:
        """The parked item as `park` was given it, or None (never parked, or unparked)."""
        raw = self.redis.hget(self._extracted_key(job_id), item_id)
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    def unpark(self, job_id: str, item_id: str) -> None:
        self.redis.hdel(self._extracted_key(job_id), item_id)

    def parked_ids(self, job_id: str) -> set[str]:
        return {k.decode() for k in self.redis.hkeys(self._extracted_key(job_id))}

    def parked_unfinished(self, job_id: str) -> list[str]:
        """Ids of the parked items neither done nor failed (their index step is pending or
        was lost); the payloads of finished ones (an indexer that died before unparking)
        are dropped on the way."""
        _, done, failed = self._keys(job_id)
        parked = self.parked_ids(job_id)
        if not parked:
            return []
        finished = {m.decode() for m in self.redis.smembers(done)}
        finished.update(k.decode() for k in self.redis.hkeys(failed))
        if stale := parked & finished:
            self.redis.hdel(self._extracted_key(job_id), *stale)
        return sorted(parked - finished)

    def first_resend(self, job_id: str, progress_mark: str) -> bool:
        """True once per `progress_mark` (the job's updated_at) and job, across gateways: a
        job that stays stalled has its parked items re-sent once, not on every sweep."""
        key = self.prefix + job_id + ":resent"
        pipe = self.redis.pipeline()  # MULTI: one gateway sees the old mark
        pipe.getset(key, progress_mark)
        pipe.expire(key, JOB_TTL_S)
        old, _ = pipe.execute()
        return old is None or old.decode() != progress_mark

    def job_ids(self):
        """Every job id in the store (a SCAN: for the gateway's periodic sweep)."""
        for key in self.redis.scan_iter(match=self.prefix + "*", count=1000):
            rest = key.decode()[len(self.prefix):]
            if is_job_id(rest):
                yield rest

    def list_jobs(self, after: str = "", limit: int = 20) -> tuple[list[JobStatus], str]:
        """(up to `limit` jobs, newest first (created_at, then id), that come after the job
        `after` ("" for the first page), without their per-item errors; the id the next page
        starts after, "" when none follows). LookupError when `after` names no job (expired)."""
        ids = list(dict.fromkeys(self.job_ids()))
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(self._keys(job_id)[0], "created_at")
        created = {i: float(c) for i, c in zip(ids, pipe.execute()) if c is not None}
        order = sorted(created, key=lambda i: (created[i], i), reverse=True)
        if after:
            if after not in created:
                raise LookupError(after)
            order = order[order.index(after) + 1:]
        page = [s for s in (self.get(i) for i in order[:limit]) if s is not None]
        for status in page:
            status.errors = []
        return page, order[limit - 1] if len(order) > limit else ""

    def claim_sweep(self, job_id: str, seconds: float) -> bool:
        """True for one caller (one gateway) per job and `seconds`."""
        return bool(self.redis.set(self.prefix + job_id + ":sweep", 1, nx=True, ex=max(1, int(seconds))))

    def finish_receiving(self, job_id: str) -> None:
        """The stream ended: the job's size is the number of recorded items."""
        self.set_total(job_id, self.recorded(job_id))

    def is_cancelled(self, job_id: str) -> bool:
        return self.redis.hget(self._keys(job_id)[0], "state") == CANCELLED.encode()

    def _maybe_complete(self, job_id: str) -> bool:
        status = self.get(job_id)
        if status and status.state == RUNNING and status.finished >= status.total:
            pipe = self.redis.pipeline()
            pipe.hset(self._keys(job_id)[0], "state", COMPLETED)
            pipe.delete(self._extracted_key(job_id))  # every item finished: nothing left to index
            pipe.execute()
            return True
        return False

    def get(self, job_id: str, explain: bool = False) -> JobStatus | None:
        """The job's status; None when no such job, or when `job_id` is not a job id
        (delf_common.contract: anything else would reach other Redis keys). `explain`: a
        stalled job's `hint` too (reads its items)."""
        if not is_job_id(job_id):
            return None
        key, done, failed = self._keys(job_id)
        pipe = self.redis.pipeline()
        pipe.hgetall(key)
        pipe.scard(done)
        pipe.hlen(failed)
        pipe.hscan(failed, count=MAX_ERRORS_REPORTED)
        same, dups, dupskipped = self._outcome_keys(job_id)
        pipe.scard(same)
        pipe.scard(dupskipped)
        pipe.hlen(dups)
        pipe.hscan(dups, count=MAX_ERRORS_REPORTED)
        fields, n_done, n_failed, (_, errors), n_same, n_skipped, n_dups, (_, dup_of) = pipe.execute()
        if not fields:
            return None
        f = {k.decode(): v.decode() for k, v in fields.items()}
        status = JobStatus(
            job_id=job_id,
            state=f["state"],
            total=int(f["total"]),
            done=int(n_done),
            failed=int(n_failed),
            errors=sorted((k.decode(), v.decode()) for k, v in errors.items()),
            created_at=float(f["created_at"]),
            updated_at=float(f["updated_at"]),
            unchanged=int(n_same), duplicates=int(n_dups), duplicates_skipped=int(n_skipped),
            duplicate_of={k.decode(): v.decode() for k, v in dup_of.items()},
        )
        _mark_stalled(status, float(f.get("received_at") or f["created_at"]), self.timings.stalled_after_s)
        if explain and status.stalled:
            status.hint = self.stall_hint(status)
        return status

    def stall_hint(self, status: JobStatus) -> str:
        """What a stalled job waits for, and the one command that finishes it."""
        # The threshold, not the idle time: a hint that changes on every look is news to no one.
        job_id, idle = status.job_id, f"over {self.timings.stalled_after_s:.0f} s"
        if status.state == RECEIVING:
            return (f"its client has sent no photo for {idle}: the upload stopped. To finish the job, "
                    f"send the rest: `delf ingest PATH --resume {job_id}` (PATH: the folder or manifest "
                    f"it was started from; photos already done are skipped)")
        unfinished = self.unfinished(job_id)
        parked = self.parked_ids(job_id) & unfinished.keys()  # their features wait in Redis
        extracted = len(parked)
        uploaded = sum(1 for i, r in unfinished.items() if r["location"] is None and i not in parked)
        located = len(unfinished) - extracted - uploaded
        waits = []
        if extracted:
            waits.append(f"{_photos(extracted)} extracted, waiting for an indexer (the gateway sends "
                         f"their index tasks again by itself once a job is stalled, `delf up` as soon as "
                         f"a worker dies: still waiting means no indexer takes them)")
        if located + uploaded:
            waits.append(f"the tasks of {_photos(located + uploaded)} lost or held by a worker that died "
                         f"(handed out again after DELF_VISIBILITY_TIMEOUT_S="
                         f"{self.timings.visibility_timeout_s:.0f} s; `delf up` restarts dead "
                         f"workers and hands their tasks out at once)")
        lead = (f"no photo finished for {idle}; {_photos(len(unfinished))} not finished"
                + "".join(": " + w for w in waits[:1]) + "".join("; " + w for w in waits[1:])
                + ". Check that the workers run (`delf stats`). ")
        if uploaded:
            return lead + (f"To finish it now: `delf ingest PATH --resume {job_id}` (PATH: the folder or "
                           f"manifest it was started from; {uploaded} of these photos were uploaded as "
                           f"bytes, which the server does not keep, so `delf resume` cannot resend them)")
        what = " and ".join(w for w in (f"the {located} photos the server reads itself" if located else "",
                                        f"the index tasks of the {extracted} extracted" if extracted else "") if w)
        what = what or "them"
        auto = self.timings.resume_after_s
        by_itself = f"; the gateway does so by itself after {auto:.0f} s without progress" if auto > 0 else ""
        return lead + f"To finish it now: `delf resume {job_id}` (resends {what}){by_itself}"


def _photos(n: int) -> str:
    return f"{n} photo{'s' if n != 1 else ''}"


def _mark_stalled(status: JobStatus, received_at: float, after: float) -> None:
    """Sets `idle_s` and `stalled` (no progress for `after` seconds, DELF_JOB_STALLED_AFTER_S)
    from the job's timestamps."""
    if status.state not in (RUNNING, RECEIVING):
        return
    last = status.updated_at if status.state == RUNNING else max(received_at, status.updated_at)
    status.idle_s = max(time.time() - last, 0.0)
    status.stalled = status.idle_s >= after
