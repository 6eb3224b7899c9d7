"""Backpressure (DELF_MAX_QUEUE) and Prometheus metrics (DELF_METRICS_PORT) of the gateway.

A real gateway process (python -m delf_gateway) on the machine's Redis (database 9,
a queue prefix of its own) with DELF_MAX_QUEUE=3 and no workers at all, so whatever
it sends stays in the extract queue:

* an ingest job of 3 photos fills the extract queue; then Search and AddImage are
  answered RESOURCE_EXHAUSTED at once and a new ingest job is refused;
* a job started with room for one more photo dispatches it, then waits for room
  and ends with the client's deadline, the queue never longer than the limit;
* GetJob still answers;
* /metrics counts the calls by method and status code.

Every process it starts is stopped and every Redis key it created is deleted.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))

from conftest import free_port, redis_available, redis_db_url

from delf_common.proto.delf.v1 import delf_pb2, delf_pb2_grpc

REDIS_URL = redis_db_url(9)
MAX_QUEUE = 3
START_TIMEOUT_S = 60


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", rgb)
    assert ok
    return buf.tobytes()


class Gateway:
    def __init__(self, root: Path, **extra_env: str):
        self.prefix = f"bp-{uuid.uuid4().hex[:8]}"
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
        self.env.update(
            DELF_REDIS_URL=REDIS_URL,
            DELF_QUEUE_PREFIX=self.prefix,
            DELF_GRPC_ADDR=self.address,
            DELF_MAX_QUEUE=str(MAX_QUEUE),
            DELF_METRICS_PORT=str(self.metrics_port),
            DELF_TASK_TIMEOUT_S="5",
            DELF_HEALTH_REQUIRE="redis",  # no workers on purpose: serving needs Redis only
            PYTHONUNBUFFERED="1",
        )
        self.env.update(extra_env)
        self.log_path = root / "gateway.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "delf_gateway"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = delf_pb2_grpc.ImageSearchStub(self.channel)
        self.redis = redis.Redis.from_url(REDIS_URL)

    def wait_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited:\n{self.tail()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not serving in {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.3)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def depth(self) -> int:
        return int(self.redis.llen(f"{self.prefix}.extract"))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        keys = list(self.redis.scan_iter(match=f"*{self.prefix}*", count=1000))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    if not redis_available(REDIS_URL):
        pytest.fail(f"no Redis at {REDIS_URL}")
    gw = Gateway(tmp_path_factory.mktemp("backpressure"))
    try:
        gw.wait_serving()
        yield gw
    finally:
        gw.close()


def _items(ids, seed: int = 0):
    for i, image_id in enumerate(ids):
        yield delf_pb2.IngestItem(image_id=image_id, image=_photo(seed + i))


@contextlib.contextmanager
def sampled_depths(gateway):
    """The extract queue's depth every 20 ms, in a list, while the block runs."""
    depths: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            depths.append(gateway.depth())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield depths
    finally:
        stop.set()
        sampler.join()


def test_full_queue_refuses_and_slows_down(gateway):
    # 1. An ingest job nobody consumes fills the extract queue to the limit.
    job = gateway.stub.StartIngestJob(_items(["a", "b", "c"]), timeout=20)
    assert job.total == 3
    assert gateway.depth() == MAX_QUEUE

    # 2. Search and AddImage are refused at once, with a message a person understands.
    for call, request in [
        (gateway.stub.Search, delf_pb2.SearchRequest(image=_photo(10))),
        (gateway.stub.AddImage, delf_pb2.AddImageRequest(image_id="x", image=_photo(11))),
    ]:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "extract queue holds 3 tasks" in err.value.details()
        assert "DELF_MAX_QUEUE" in err.value.details()
        assert time.monotonic() - started < 3
    assert gateway.depth() == MAX_QUEUE

    # 3. A new job is refused while the queue is full.
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.StartIngestJob(_items(["d", "e"]), timeout=20)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert gateway.depth() == MAX_QUEUE

    # 4. With room for one photo, a job sends it, then waits for room until the
    #    client's deadline; the queue never grows past the limit.
    gateway.redis.rpop(f"{gateway.prefix}.extract")
    assert gateway.depth() == MAX_QUEUE - 1
    with sampled_depths(gateway) as depths:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            gateway.stub.StartIngestJob(_items([f"s{i}" for i in range(6)], seed=20), timeout=2.0)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # the gateway notices the deadline and stops
    assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert elapsed >= 1.5, "the stream was not held back"
    assert max(depths) <= MAX_QUEUE, depths
    assert gateway.depth() == MAX_QUEUE

    # 5. Job queries need no worker and still answer.
    got = gateway.stub.GetJob(delf_pb2.GetJobRequest(job_id=job.job_id), timeout=5)
    assert got.job_id == job.job_id and got.total == 3

    # 6. The refusals are counted.
    metrics = gateway.metrics()
    for method in ("Search", "AddImage", "StartIngestJob"):
        assert f'delf_gateway_requests_total{{code="RESOURCE_EXHAUSTED",method="{method}"}}' in metrics or \
            f'delf_gateway_requests_total{{method="{method}",code="RESOURCE_EXHAUSTED"}}' in metrics, method


def test_metrics_count_calls_by_method_and_code(gateway):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.Search(delf_pb2.SearchRequest(image=b""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.GetJob(delf_pb2.GetJobRequest(job_id="0123456789abcdef0123456789abcdef"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(gateway.metrics()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in samples, f"{key} not in /metrics: {sorted(samples)}"
        return samples[key]

    assert value("delf_gateway_requests_total", method="Search", code="INVALID_ARGUMENT") >= 1
    assert value("delf_gateway_requests_total", method="GetJob", code="NOT_FOUND") >= 1
    assert value("delf_gateway_request_seconds_count", method="Search") >= 1
    assert ("delf_queue_depth", (("queue", "extract"),)) in samples  # sampled by the health thread


@pytest.fixture(scope="module")
def search_limited_gateway(tmp_path_factory):
    """A gateway that works on at most 2 searches at once, a roomy queue and no workers."""
    if not redis_available(REDIS_URL):
        pytest.fail(f"no Redis at {REDIS_URL}")
    gw = Gateway(tmp_path_factory.mktemp("max_searches"), DELF_MAX_SEARCHES="2", DELF_MAX_QUEUE="100")
    try:
        gw.wait_serving()
        yield gw
    finally:
        gw.close()


def test_search_limit_refuses_at_once_and_unrun_tasks_expire(search_limited_gateway):
    gw = search_limited_gateway
    # Two searches wait for an extractor that never comes (no workers) ...
    outcomes: list[grpc.StatusCode] = []

    def slow_search(seed: int) -> None:
        try:
            gw.stub.Search(delf_pb2.SearchRequest(image=_photo(seed)), timeout=4)
            outcomes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    threads = [threading.Thread(target=slow_search, args=(30 + i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3
    while gw.depth() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.depth() == 2
    # ... so a third is refused at once, saying why, instead of queueing behind them.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        gw.stub.Search(delf_pb2.SearchRequest(image=_photo(40)), timeout=20)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "DELF_MAX_SEARCHES=2" in err.value.details()
    assert time.monotonic() - started < 2
    for t in threads:
        t.join()
    assert outcomes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    # The queued tasks carry an expiry near the callers' deadline, so a worker that
    # reaches them late drops them unrun.
    import json

    for raw in gw.redis.lrange(f"{gw.prefix}.extract", 0, -1):
        expires = json.loads(raw)["headers"]["expires"]
        assert expires is not None
        from datetime import datetime, timezone

        left = (datetime.fromisoformat(expires) - datetime.now(timezone.utc)).total_seconds()
        assert -10 < left < 5, expires
    # The slots are free again once the gateway stops waiting for those calls' tasks.
    give_up = time.monotonic() + 15
    while True:
        with pytest.raises(grpc.RpcError) as err:
            gw.stub.Search(delf_pb2.SearchRequest(image=_photo(41)), timeout=1.5)
        if err.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
            break
        time.sleep(0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
