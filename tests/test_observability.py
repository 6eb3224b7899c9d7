"""Observability with real processes: request and job ids in every service's logs, the
gateway's health per dependency, and worker metrics gathered from prefork children.

* A system started by the launcher (`delf up`) with DELF_LOG_FORMAT=json, a 1 s worker
  heartbeat and a 0.5 s health watch: a Search sent with `x-request-id: R` gets R back
  and leaves JSON log lines carrying R in the gateway, extractor, indexer and verifier;
  an ingest job's id (and its request id, through the extract -> index chain) appears in
  the workers' lines; health is SERVING for the server and each dependency; a frozen
  (SIGSTOP) indexer turns "indexer" and the overall health NOT_SERVING, and SERVING
  again once it runs on (SIGCONT). (The launcher stops everything when a child dies, so
  a real kill is tested on the hand-made pair below.)
* A gateway and a prefork verifier worker started by hand: the worker's /metrics counts
  the tasks of both children; kill -9 of the worker turns "verifier" NOT_SERVING, a new
  worker brings it back to SERVING.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TEST_REDIS_URL, RunningSystem, free_port, redis_available, system_env
from photos import jpeg, sample_photo
from polling import wait_for

from delf_common.proto.delf.v1 import delf_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN
DEPENDENCIES = ("redis", "extractor", "indexer", "verifier", "milvus")
def health(address: str, name: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=5).status
        except grpc.RpcError as exc:
            return -1 if exc.code() != grpc.StatusCode.NOT_FOUND else -2


def json_records(path: Path) -> list[dict]:
    """The JSON objects among a log file's lines."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


# --------------------------------------------------------------------------- the formats, in process


def test_json_lines_carry_the_bound_ids_and_extra_fields():
    import io
    import logging

    from delf_common import logs

    stream = io.StringIO()
    handler = logs.setup("unit", level="DEBUG", fmt="json", stream=stream)
    try:
        log = logging.getLogger("delf.unit")
        with logs.bound(request_id="r-1", job_id="j-1"):
            log.info("hello %s", "world", extra={"method": "Search", "duration_s": 0.5})
            with logs.bound(image_id="i\n1"):
                log.warning("inner")
        log.info("outside")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    first, inner, outside, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello world" and first["service"] == "unit" and first["logger"] == "delf.unit"
    assert (first["request_id"], first["job_id"], first["method"], first["duration_s"]) == ("r-1", "j-1", "Search", 0.5)
    assert first["level"] == "INFO" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert inner["image_id"] == "i\n1" and inner["request_id"] == "r-1" and inner["level"] == "WARNING"
    assert not {"request_id", "job_id", "image_id"} & set(outside)  # unbound after the block
    assert "ValueError: boom" in failed["exc"]


def test_text_lines_end_with_the_ids():
    import io
    import logging

    from delf_common import logs

    stream = io.StringIO()
    handler = logs.setup("unit", level="INFO", fmt="text", stream=stream)
    try:
        with logs.bound(request_id="r-2", task_id="t-2"):
            logging.getLogger("delf.unit").info("task done")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().rstrip().endswith("INFO delf.unit: task done [request_id=r-2 task_id=t-2]")


@pytest.mark.parametrize("given,kept", [("abc-123", True), ("a" * 128, True), ("a" * 129, False), ("", False),
                                        ("with space", False), ("semi;colon", False), (b"\xff", False)])
def test_which_request_ids_are_kept(given, kept):
    from delf_common import logs

    assert (logs.clean_request_id(given) is not None) == kept


# --------------------------------------------------------------------------- the launched system


@pytest.fixture(scope="module")
def obs(tmp_path_factory):
    if not redis_available(TEST_REDIS_URL):
        pytest.fail(f"no Redis at {TEST_REDIS_URL}: start one (`.ci/run` does) or set DELF_TEST_REDIS_URL")
    root = tmp_path_factory.mktemp("observability")
    running = RunningSystem(root, system_env(root, DELF_LOG_FORMAT="json", DELF_HEARTBEAT_S="1",
                                             DELF_HEALTH_INTERVAL_S="0.5"))
    running.start()
    client = running.client(timeout=120)
    client.add_image("obs-coffee", jpeg(sample_photo("coffee")))
    yield running
    client.close()
    running.stop()
    shutil.rmtree(root / "data", ignore_errors=True)


def records_with(system: RunningSystem, **match: str) -> list[dict]:
    return [r for r in json_records(system.log_path) if all(r.get(k) == v for k, v in match.items())]


@pytest.mark.slow
def test_every_line_of_the_json_system_is_a_json_object(obs):
    lines = [ln for ln in obs.log_path.read_text(errors="replace").splitlines() if ln.strip()]
    not_json = [ln for ln in lines if not ln.lstrip().startswith("{")]
    assert not not_json, f"{len(not_json)} lines are not JSON, e.g. {not_json[:3]}"
    records = json_records(obs.log_path)
    assert len(records) == len(lines)
    for r in records[:200]:
        assert {"ts", "level", "service", "logger", "message"} <= set(r), r
    services = {r["service"] for r in records}
    assert {"gateway", "extractor", "indexer", "verifier", "up"} <= services, services


@pytest.mark.slow
def test_a_search_request_id_is_returned_and_logged_by_every_service(obs):
    client = obs.client(timeout=120)
    request_id = f"obs-search-{uuid.uuid4().hex[:8]}"
    reply, call = client.stub.Search.with_call(
        delf_pb2.SearchRequest(image=jpeg(sample_photo("coffee")), top_k=3),
        metadata=[("x-request-id", request_id)], timeout=120)
    assert reply.matches and reply.matches[0].image_id == "obs-coffee"
    assert dict(call.trailing_metadata())["x-request-id"] == request_id

    def services_logging_it():
        # A worker logs its task's outcome after the reply has left it: wait for those lines
        # (and the gateway's), not for any line of each service.
        lines = records_with(obs, request_id=request_id)
        found = {r["service"] for r in lines if r.get("logger") == "delf.task" and r.get("outcome")}
        found |= {r["service"] for r in lines if r["service"] == "gateway" and r.get("method") == "Search"}
        return found if {"gateway", "extractor", "indexer", "verifier"} <= found else None

    wait_for(services_logging_it, f"the gateway's line and every worker's task outcome with request_id {request_id}")
    lines = records_with(obs, request_id=request_id)
    gateway = [r for r in lines if r["service"] == "gateway" and r.get("method") == "Search"]
    assert len(gateway) == 1 and gateway[0]["code"] == "OK" and gateway[0]["duration_s"] > 0, gateway
    finished = {r["service"]: r for r in lines if r.get("logger") == "delf.task" and r.get("outcome") == "ok"}
    assert {"extractor", "indexer", "verifier"} <= set(finished), lines
    assert all(r.get("task_id") for r in finished.values())
    client.close()


@pytest.mark.slow
def test_a_refused_call_carries_its_request_id_too(obs):
    client = obs.client(timeout=60)
    request_id = f"obs-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetImage(delf_pb2.GetImageRequest(image_id="never-indexed"),
                             metadata=[("x-request-id", request_id)], timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata())["x-request-id"] == request_id
    line = wait_for(lambda: [r for r in records_with(obs, request_id=request_id, service="gateway")
                             if r.get("method") == "GetImage"], "the gateway's line for the refused call")
    assert line[0]["code"] == "NOT_FOUND" and "never-indexed" in line[0]["error"]

    # No id, or one that is not a sensible id (spaces, too long): the gateway makes one.
    for given in (None, "has spaces in it", "x" * 300):
        metadata = [("x-request-id", given)] if given else None
        _, call = client.stub.GetStats.with_call(delf_pb2.GetStatsRequest(), metadata=metadata, timeout=60)
        made = dict(call.trailing_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made), made
    client.close()


@pytest.mark.slow
def test_an_ingest_jobs_ids_follow_it_through_the_workers(obs):
    client = obs.client(timeout=120)
    request_id = f"obs-ingest-{uuid.uuid4().hex[:8]}"
    names = ("astronaut", "rocket")
    items = [delf_pb2.IngestItem(image_id=f"obs-{n}", image=jpeg(sample_photo(n))) for n in names]
    job, _ = client.stub.StartIngestJob.with_call(iter(items), metadata=[("x-request-id", request_id)],
                                                  timeout=120)
    final = client.wait_job(job.job_id)
    assert final.done == len(names), final

    def indexed_lines():
        lines = [r for r in records_with(obs, job_id=job.job_id)
                 if r.get("logger") == "delf.task" and r.get("task") == "delf.ingest.index"
                 and r.get("outcome") == "ok"]
        return lines if len(lines) == len(names) else None

    finished = wait_for(indexed_lines, f"the indexer's lines for job {job.job_id}")
    assert {r["image_id"] for r in finished} == {f"obs-{n}" for n in names}
    # The index step is sent by the extractor worker (the chain's next step): the call's
    # request id travelled from the gateway through the extractor to the indexer.
    assert {r.get("request_id") for r in finished} == {request_id}
    services = {r["service"] for r in records_with(obs, job_id=job.job_id)}
    assert {"gateway", "extractor", "indexer"} <= services, services
    client.close()


@pytest.mark.slow
def test_health_is_serving_for_the_server_and_each_dependency(obs, capsys):
    from delf_gateway import healthcheck

    for name in ("", "delf.v1.ImageSearch", *DEPENDENCIES):
        wait_for(lambda: health(obs.address, name) == SERVING, f"health {name!r} SERVING")  # noqa: B023 - called at once, inside the loop
    assert health(obs.address, "no-such-dependency") == -2  # NOT_FOUND
    capsys.readouterr()
    assert healthcheck.main([obs.address, "--all"]) == 0
    out = capsys.readouterr().out
    for name in DEPENDENCIES:
        assert f"{name}: SERVING" in out, out


def _children(system: RunningSystem, marker: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.Process(system.proc.pid).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


@pytest.mark.slow
def test_a_frozen_indexer_is_reported_until_it_runs_again(obs, capsys):
    from delf_gateway import healthcheck

    indexers = _children(obs, "delf_indexer.tasks")
    assert indexers, "no indexer worker under the launcher"
    for p in indexers:
        p.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: health(obs.address, "indexer") == NOT_SERVING, "indexer NOT_SERVING")
        wait_for(lambda: health(obs.address, "") == NOT_SERVING, "overall NOT_SERVING")
        assert health(obs.address, "delf.v1.ImageSearch") == NOT_SERVING
        assert health(obs.address, "milvus") == UNKNOWN  # nobody left to ask
        for name in ("redis", "extractor", "verifier"):
            assert health(obs.address, name) == SERVING, name
        assert healthcheck.main([obs.address]) == 1  # the container healthcheck fails
        assert healthcheck.main([obs.address, "--service", "indexer"]) == 1
        assert healthcheck.main([obs.address, "--service", "verifier"]) == 0
        assert "NOT_SERVING" in capsys.readouterr().err
    finally:
        for p in indexers:
            p.send_signal(signal.SIGCONT)
    wait_for(lambda: health(obs.address, "indexer") == SERVING, "indexer SERVING again")
    wait_for(lambda: health(obs.address, "") == SERVING, "overall SERVING again")
    down = [r for r in records_with(obs, service="gateway") if r["message"].startswith("health: NOT_SERVING")]
    assert down and "indexer" in down[-1]["message"], down
    client = obs.client(timeout=60)
    assert client.get_image("obs-coffee").num_features > 0  # the indexer answers again
    client.close()


# --------------------------------------------------------------------------- a hand-made pair


class Pair:
    """A gateway (health needs Redis and a verifier) and prefork verifier workers, by hand."""

    def __init__(self, root: Path):
        self.root = root
        self.address = f"127.0.0.1:{free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DELF_", "PROMETHEUS_"))}
        self.env.update(
            DELF_REDIS_URL=TEST_REDIS_URL, DELF_QUEUE_PREFIX=f"delftest-obs-{uuid.uuid4().hex[:8]}",
            DELF_GRPC_ADDR=self.address, DELF_LOG_FORMAT="json", DELF_HEARTBEAT_S="1",
            DELF_HEALTH_INTERVAL_S="0.5", DELF_HEALTH_REQUIRE="redis,verifier", PYTHONUNBUFFERED="1",
        )
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def spawn(self, name: str, argv: list[str], **env: str) -> None:
        self.logs[name] = self.root / f"{name}.log"
        with open(self.logs[name], "wb") as out:
            self.procs[name] = subprocess.Popen(argv, env={**self.env, **env}, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def verifier(self, name: str, pool: str = "prefork", **env: str) -> None:
        self.spawn(name, [sys.executable, "-m", "celery", "-A", "delf_verifier.tasks", "worker",
                          "-Q", f"{self.env['DELF_QUEUE_PREFIX']}.verify", "--pool", pool,
                          "--concurrency", "2", "--without-gossip", "--without-mingle", "-n", f"{name}@%h"],
                   **env)

    def celery(self):
        from delf_common import celery_app, contract

        saved = {k: os.environ.get(k) for k in ("DELF_REDIS_URL", "DELF_QUEUE_PREFIX")}
        os.environ.update(DELF_REDIS_URL=self.env["DELF_REDIS_URL"], DELF_QUEUE_PREFIX=self.env["DELF_QUEUE_PREFIX"])
        try:
            return celery_app.make_app("obs-test"), contract.queue_name("verify", self.env["DELF_QUEUE_PREFIX"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with_group = os.getpgid(proc.pid)
                os.killpg(with_group, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(with_group, signal.SIGKILL)
                    proc.wait()


@pytest.fixture
def pair(tmp_path):
    if not redis_available(TEST_REDIS_URL):
        pytest.fail(f"no Redis at {TEST_REDIS_URL}")
    p = Pair(tmp_path)
    p.spawn("gateway", [sys.executable, "-m", "delf_gateway"])
    yield p
    p.stop()


def verify_job(rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """A verify task with enough random correspondences to keep RANSAC busy a moment."""
    from delf_common.features import encode_array

    n = 1500
    query = {"locations": encode_array((rng.random((n, 2)) * 500).astype(np.float32)),
             "image_size": [500, 500], "box": None}
    candidates = [{"image_id": f"c{i}", "votes": n, "query_idx": encode_array(np.arange(n, dtype=np.int32)),
                   "db_xy": encode_array((rng.random((n, 2)) * 500).astype(np.float32))} for i in range(3)]
    return query, candidates


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_prefork_children_are_counted_and_a_killed_worker_is_reported(pair):
    port = free_port()
    pair.verifier("v1", DELF_METRICS_PORT=str(port))
    wait_for(lambda: health(pair.address, "") == SERVING, "the pair's health SERVING")
    assert health(pair.address, "verifier") == SERVING
    assert health(pair.address, "indexer") == NOT_SERVING  # none runs; not required here

    app, queue = pair.celery()
    rng = np.random.default_rng(0)
    n_tasks = 16
    try:
        results = [app.send_task("delf.verify", args=[*verify_job(rng), {}], queue=queue) for _ in range(n_tasks)]
        replies = [r.get(timeout=120) for r in results]
    finally:
        app.close()
    assert all(r["ok"] for r in replies)

    finished = wait_for(lambda: (lambda lines: lines if len(lines) == n_tasks else None)(
        [r for r in json_records(pair.logs["v1"]) if r.get("logger") == "delf.task" and r.get("outcome")]),
        "a finished line per task in the worker's log")
    pids = {r["pid"] for r in finished}
    main_pid = pair.procs["v1"].pid
    assert main_pid not in pids and len(pids) == 2, f"tasks ran in {pids}; expected both prefork children"
    samples = scrape(port)
    ok = ("delf_worker_tasks_total", (("outcome", "ok"), ("task", "delf.verify")))
    assert samples.get(ok) == n_tasks, {k: v for k, v in samples.items() if k[0].startswith("delf_worker")}
    assert samples.get(("delf_worker_task_seconds_count", (("task", "delf.verify"),))) == n_tasks

    os.killpg(os.getpgid(main_pid), signal.SIGKILL)  # the worker and its children, no goodbye
    pair.procs["v1"].wait(30)
    wait_for(lambda: health(pair.address, "verifier") == NOT_SERVING, "verifier NOT_SERVING after kill -9")
    assert health(pair.address, "") == NOT_SERVING
    pair.verifier("v2", pool="solo")
    wait_for(lambda: health(pair.address, "verifier") == SERVING, "verifier SERVING with a new worker")
    wait_for(lambda: health(pair.address, "") == SERVING, "overall SERVING with a new worker")
