"""Issue 14, items 5 and 6: a stalled job says so and what to do; `delf up` heals itself.

* item 5 (Redis only, DB of DELF_TEST_REDIS_URL): a job with no progress for
  DELF_JOB_STALLED_AFTER_S is reported stalled in `Job` and by `delf job`, with what it
  waits for and the one command that finishes it; `delf resume` never waits silently for
  photos only the client has.
* item 6 (slow, a `delf up` of the test's own, tests/up_system.py: embedded Redis, default
  settings, the visibility timeout and the stall sweep left at their defaults of 1 h and
  2 h, so nothing but the launcher's own healing can finish the jobs in time): kill -9 of
  each worker kind during a job: the worker comes back by itself, the others keep their
  pids, the job completes without any command, every photo indexed exactly once; then
  kill -9 of the whole `delf up` mid-job and a restart: the job completes by itself and
  `delf resume JOB` answers at once. `-s` prints the table of BENCHMARKS.md
  ("Self-healing under delf up"); scripts/bench_faults.py reruns it.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import redis_db_url
from up_system import UpSystem, small_photos

from delf_common.proto.delf.v1 import delf_pb2

JOB_TIMEOUT_S = float(os.environ.get("DELF_TEST_JOB_TIMEOUT_S", 600))  # "within minutes", on a loaded 2-core machine
PHOTOS_PER_JOB = 10
RESULTS: list[dict] = []    # one row per fault, printed as the BENCHMARKS.md table


# --------------------------------------------------------------------------- item 5


@pytest.fixture
def job_store(monkeypatch):
    from delf_common.jobs import JobStore

    monkeypatch.setenv("DELF_REDIS_URL", redis_db_url())
    monkeypatch.setenv("DELF_QUEUE_PREFIX", f"heal-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv("DELF_JOB_STALLED_AFTER_S", raising=False)
    store = JobStore()
    yield store
    for key in store.redis.scan_iter(match=store.prefix + "*"):
        store.redis.delete(key)


def stalled_after(store, seconds: float, monkeypatch) -> None:
    """The store's DELF_JOB_STALLED_AFTER_S from now on (read when a store is built)."""
    monkeypatch.setattr(store, "timings", dataclasses.replace(store.timings, stalled_after_s=seconds))


def _job_with(store, uploaded: int, located: int, done: int) -> str:
    job_id = store.create()
    for i in range(uploaded):
        store.record_item(job_id, f"u{i}", {})
    for i in range(located):
        store.record_item(job_id, f"l{i}", {}, location=f"/photos/l{i}.jpg")
    store.finish_receiving(job_id)
    for i in range(done):
        store.mark_done(job_id, f"u{i}" if i < uploaded else f"l{i - uploaded}")
    return job_id


def _printed(job) -> str:
    from delf_tools.cli import _print_job

    out = io.StringIO()
    _print_job(job, out=out)
    return out.getvalue()


def test_item5_a_stalled_job_says_so_and_what_to_do(job_store, monkeypatch):
    from delf_gateway.ingest import job_proto

    job_id = _job_with(job_store, uploaded=3, located=1, done=1)
    time.sleep(0.3)
    fresh = job_proto(job_store.get(job_id, explain=True))
    assert not fresh.stalled and fresh.eta_s > 0, fresh  # progress just now: default 120 s
    assert "STALLED" not in _printed(fresh)

    stalled_after(job_store, 0.5, monkeypatch)
    time.sleep(0.6)
    job = job_proto(job_store.get(job_id, explain=True))
    assert job.stalled and job.idle_s >= 0.5 and job.eta_s == 0, job
    assert "3 photos not finished" in job.hint
    assert f"`delf ingest PATH --resume {job_id}`" in job.hint  # 2 were uploaded as bytes
    text = _printed(job)
    assert "RUNNING (STALLED: no progress for" in text and job.hint in text and "eta" not in text, text

    job_store.mark_done(job_id, "u1")  # it moves again: no longer stalled
    assert not job_store.get(job_id, explain=True).stalled

    located = _job_with(job_store, uploaded=0, located=2, done=1)
    time.sleep(0.6)
    status = job_store.get(located, explain=True)
    assert status.stalled and f"`delf resume {located}`" in status.hint, status

    receiving = job_store.create()
    job_store.record_item(receiving, "r0", {})
    time.sleep(0.6)
    status = job_store.get(receiving, explain=True)
    assert status.stalled and "has sent no photo" in status.hint and "--resume" in status.hint, status


def test_item5_watch_job_does_not_repeat_a_stalled_job_on_every_look(job_store, monkeypatch):
    """WatchJob sends a Job when it changes: the growing idle time alone is not a change."""
    from delf_gateway.ingest import IngestJobs

    stalled_after(job_store, 0.3, monkeypatch)
    job_id = _job_with(job_store, uploaded=2, located=0, done=1)
    gateway = IngestJobs.__new__(IngestJobs)
    gateway.jobs = job_store

    class Context:
        deadline = time.monotonic() + 2.0

        def is_active(self):
            return time.monotonic() < self.deadline

    seen = list(gateway.WatchJob(delf_pb2.GetJobRequest(job_id=job_id), Context()))
    assert [j.stalled for j in seen] == [False, True], seen


def test_item6_delf_resume_does_not_wait_forever_for_photos_only_the_client_has(monkeypatch, capsys):
    """The hang of issue 14: after a restart, `delf resume JOB` got "0 re-sent, 1 awaiting
    upload" (the photo was streamed as bytes) and then watched a job that could not move."""
    from delf_tools import cli

    forever = threading.Event()

    class Client:
        def get_job(self, job_id):  # stalled: no progress since the restart
            return delf_pb2.Job(job_id=job_id, state=delf_pb2.JOB_STATE_RUNNING, total=20, done=19,
                                stalled=True, idle_s=300.0)

        def resume_job(self, job_id):
            return delf_pb2.Job(job_id=job_id, state=delf_pb2.JOB_STATE_RUNNING, total=20, done=19,
                                resent=0, awaiting_upload=1)

        def watch_job(self, job_id):
            yield delf_pb2.Job(job_id=job_id, state=delf_pb2.JOB_STATE_RUNNING, total=20, done=19)
            forever.wait()  # the job cannot move: the server never sends another update

    monkeypatch.setattr(cli, "gateway_client", lambda args: Client())
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", cli.main(["resume", "J1", "--quiet"])),
                              daemon=True)
    runner.start()
    runner.join(20)
    forever.set()
    assert not runner.is_alive(), "delf resume waits for a job that cannot complete"
    err = capsys.readouterr().err
    assert result["rc"] != 0 and "`delf ingest PATH --resume J1`" in err, (result, err)


def test_item6_restart_policy_backs_off_and_gives_up_on_a_crash_loop():
    from delf_tools.restarts import RestartPolicy

    policy = RestartPolicy(max_restarts=5, window_s=120.0)
    assert [policy.delay("index", t) for t in (0, 1, 2, 3, 4)] == [1, 2, 4, 8, 16]
    assert policy.delay("index", 5) is None              # the 6th death within 2 minutes
    assert policy.delay("verify", 5) == 1                # each service counts its own
    assert policy.delay("index", 200) == 1               # deaths long ago are forgotten


# --------------------------------------------------------------------------- item 6, live


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    system = UpSystem(tmp_path_factory.mktemp("heal"))
    system.start()
    yield system
    system.stop()


def _items(prefix: str, n: int) -> list:
    return [delf_pb2.IngestItem(image_id=f"{prefix}-{name}", image=data)
            for name, data in small_photos(n, seed=sum(prefix.encode()))]


def _wait(client, job_id: str, until, timeout: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job stuck: {job}"
        time.sleep(0.2)


def _exactly_once(client, items, before) -> None:
    """The job's photos are each indexed once: present, and the index grew by exactly them."""
    infos = [client.get_image(item.image_id) for item in items]
    assert all(info.num_features > 0 for info in infos)
    stats = client.stats()
    assert stats.images - before.images == len(items), (stats, before)
    assert stats.descriptors - before.descriptors == sum(i.num_features for i in infos), (stats, before)


def _back_after(up: UpSystem, name: str, since: int) -> float:
    """Seconds from its death to serving again, as the launcher's log says."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    pattern = re.compile(rf"\b{re.escape(name)} is serving again, ([0-9.]+) s after it died", re.M)
    while True:
        found = pattern.findall(up.log())
        if len(found) > since:
            return float(found[since])
        assert time.monotonic() < deadline, f"{name} not back\n{up.report()}"
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
# indexer: a kill -9 while kombu's BRPOP hands it a message loses that message; the
# photo's features wait in Redis (delf_common.parked) and `delf up` re-sends its index task.
@pytest.mark.parametrize("kind", ["extractor", "indexer", "verifier"])
def test_item6_kill_9_of_a_worker_mid_job_heals_by_itself(up, kind):
    from up_system import WORKER_MODULES

    name = WORKER_MODULES[kind][1]
    items = _items(f"k{kind[:3]}", PHOTOS_PER_JOB)
    with up.client(timeout=300) as client:
        before = client.stats()
        others = {n: p for n, p in up.pids().items() if n != name}
        victim = up.worker_pid(kind)
        job_id = client.start_ingest_job(items).job_id
        _wait(client, job_id, lambda j: j.done >= 2)
        killed_at = time.monotonic()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        searched = None
        if kind == "verifier":  # its work is searches: one sent at once waits for its return
            reply = client.search(items[0].image, top_k=3)
            searched = time.monotonic() - killed_at
            assert reply.matches and reply.matches[0].image_id == items[0].image_id, reply
        try:
            job = _wait(client, job_id, lambda j: j.state == delf_pb2.JOB_STATE_COMPLETED)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{up.report(80)}") from None
        completed = time.monotonic() - killed_at
        assert (job.done, job.failed) == (len(items), 0), job
        back = _back_after(up, name, 0)
        assert up.worker_pid(kind) != victim
        _exactly_once(client, items, before)
        alive = up.pids()
        assert all(alive.get(n) == p for n, p in others.items() if n != "redis"), (others, alive)
    RESULTS.append({"fault": f"kill -9 {kind} ({name})", "back_s": back, "done_s": completed,
                    "search_s": searched, "photos": len(items)})


@pytest.mark.slow
@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_item6_kill_9_of_the_whole_up_mid_job_then_restart_finishes_it(up):
    items = _items("whole", 2 * PHOTOS_PER_JOB)
    with up.client(timeout=300) as client:
        before = client.stats()
        job_id = client.start_ingest_job(items).job_id
        _wait(client, job_id, lambda j: j.done >= 3)
    up.kill_all()
    killed_at = time.monotonic()
    started = up.start()
    with up.client(timeout=300) as client:
        job = _wait(client, job_id, lambda j: j.state == delf_pb2.JOB_STATE_COMPLETED)
        completed = time.monotonic() - killed_at
        assert (job.done, job.failed) == (len(items), 0), job
        _exactly_once(client, items, before)
    began = time.monotonic()
    resumed = subprocess.run([sys.executable, "-m", "delf_tools.cli", "--gateway", up.grpc_addr, "resume", job_id],
                             capture_output=True, text=True, timeout=60)
    assert time.monotonic() - began < 60 and resumed.returncode == 0, resumed
    assert f"job {job_id} is finished: {len(items)} indexed, 0 failed; nothing to resume" in resumed.stdout, resumed
    handed = re.findall(r"handed out again (\d+) tasks? the workers of a previous run", up.log())
    RESULTS.append({"fault": "kill -9 of `delf up` + restart", "back_s": started, "done_s": completed,
                    "search_s": None, "photos": len(items), "note": f"{handed[0] if handed else 0} held tasks "
                                                                    f"handed out again at start"})


def test_zz_print_the_table():
    """`pytest -s tests/test_healing.py` prints the BENCHMARKS.md table of the runs above."""
    if RESULTS:
        print("\n" + table(RESULTS))


def table(rows: list[dict]) -> str:
    lines = ["| fault | photos | service back (s) | job completed, from the kill (s) | search during recovery (s) | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        search = f"{r['search_s']:.1f}" if r.get("search_s") is not None else "-"
        lines.append(f"| {r['fault']} | {r['photos']} | {r['back_s']:.1f} | {r['done_s']:.1f} | {search} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)
