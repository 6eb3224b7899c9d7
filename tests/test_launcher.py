"""`delf up` end to end: the launcher starts the embedded system (its own Redis,
workers, gateway, Milvus Lite), reports ready, serves the user's story (ingest,
search), and stops everything cleanly on Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from delf_common.client import DelfClient
from photos import jpeg, map_points, sample_photo, warped_query

READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_block(n: int) -> int:
    """The first of `n` consecutive free ports."""
    for _ in range(50):
        base = _free_port()
        if base + n < 65536 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def launcher_env() -> dict[str, str]:
    """The environment of `make up` on a fresh machine: no external broker or Milvus."""
    env = dict(os.environ)
    for name in ("DELF_REDIS_URL", "DELF_MILVUS_URI", "DELF_MILVUS_TOKEN", "DELF_GRPC_ADDR",
                 "DELF_DATA_DIR"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_launcher(env: dict[str, str], output: Path, data_dir: Path, grpc_port: int, redis_port: int,
                    ready_file: Path) -> subprocess.Popen:
    """`python -m delf_tools.launcher` (what `delf up` runs), its output in `output`."""
    with open(output, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "delf_tools.launcher",
             "--data-dir", str(data_dir),
             "--grpc-addr", f"127.0.0.1:{grpc_port}",
             "--redis-port", str(redis_port),
             "--ready-file", str(ready_file),
             "--log-dir"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest must not reach it directly
        )


def _wait_ready(proc: subprocess.Popen, ready_file: Path, report) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists():
        assert proc.poll() is None, f"launcher exited with {proc.returncode}\n{report()}"
        assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S} s\n{report()}"
        time.sleep(0.5)


def _check_ingest_and_search(photos: Path, grpc_port: int) -> None:
    """The user's story on this embedded default: ingest a folder, search a warped copy."""
    photos.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        (photos / f"{name}.jpg").write_bytes(jpeg(sample_photo(name)))
    with DelfClient(f"127.0.0.1:{grpc_port}", timeout=120) as client:
        job = client.wait_job(client.ingest_folder(photos).job_id)
        assert (job.done, job.failed) == (3, 0), job
        query, H = warped_query(sample_photo("rocket"), seed=7)
        best = client.search(jpeg(query), top_k=3).matches[0]
        assert best.image_id == "rocket" and best.verified
        h, w = query.shape[:2]
        truth = map_points(H, [[0, 0], [w, 0], [w, h], [0, h]])
        assert np.abs(np.array([[p.x, p.y] for p in best.corners]) - truth).max() <= 10.0


def _check_metrics(metrics_base: int, output: Path) -> None:
    """Every service serves its own metrics: the extractor and indexer count the job's work."""
    scraped = {}
    for i, name in enumerate(("extract-1", "index", "verify", "gateway")):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_base + i}/metrics", timeout=10) as r:
            scraped[name] = r.read().decode()
    assert f"extract-1 :{metrics_base}" in output.read_text()
    assert any(line.startswith("delf_gateway_requests_total{") and 'method="Search"' in line
               and 'code="OK"' in line for line in scraped["gateway"].splitlines()), scraped["gateway"][:2000]
    for name in ("extract-1", "index"):
        done = [line for line in scraped[name].splitlines()
                if line.startswith("delf_worker_tasks_total") and 'outcome="ok"' in line]
        assert done and sum(float(x.rsplit(" ", 1)[1]) for x in done) >= 3, (name, scraped[name][:2000])


def _check_embedded_broker(redis_port: int, data_dir: Path) -> None:
    broker = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)
    try:
        assert broker.ping()
        # The embedded broker keeps its jobs on disk, in the data dir.
        assert broker.config_get("appendonly")["appendonly"] == "yes"
        assert Path(broker.config_get("dir")["dir"]) == (data_dir / "redis").resolve()
    finally:
        broker.close()


def _stop_and_check_nothing_is_left(proc: subprocess.Popen, children: set[int], ready_file: Path,
                                    redis_port: int, report) -> None:
    """Ctrl-C (SIGINT): the launcher exits 0, and stops every process it started, its
    ready file and the embedded Redis with it."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher still running {STOP_TIMEOUT_S} s after SIGINT\n{report()}")
    assert code == 0, report()
    survivors = [pid for pid in children if _running(pid)]
    assert not survivors, f"still running after the launcher exited: {survivors}\n{report()}"
    assert not ready_file.exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0, "embedded Redis still listens"


def _kill_everything(proc: subprocess.Popen) -> None:
    """The test failed half-way: leave nothing behind."""
    for pid in _descendants(proc.pid):
        for kill in (os.killpg, os.kill):  # its process group, else itself
            try:
                kill(pid, signal.SIGKILL)
                break
            except OSError:
                pass
    proc.kill()
    proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(READY_TIMEOUT_S + STOP_TIMEOUT_S + 60)
def test_up_starts_everything_and_stops_cleanly(tmp_path: Path, launcher_env: dict[str, str]):
    if not sys.platform.startswith("linux"):
        pytest.skip("checks processes through /proc")
    grpc_port, redis_port = _free_port(), _free_port()
    # Four services on one machine: each gets its own /metrics port, counting up.
    metrics_base = _free_port_block(4)
    launcher_env["DELF_METRICS_PORT"] = str(metrics_base)
    data_dir = tmp_path / "data"
    ready_file = tmp_path / "ready.json"
    output = tmp_path / "launcher.out"
    proc = _start_launcher(launcher_env, output, data_dir, grpc_port, redis_port, ready_file)

    def report() -> str:
        text = f"launcher output:\n{output.read_text(errors='replace')}"
        logs = data_dir / "logs"
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            text += f"\n--- {log.name} (last lines) ---\n" + "\n".join(tail)
        return text

    try:
        _wait_ready(proc, ready_file, report)
        info = json.loads(ready_file.read_text())
        assert info["gateway"] == f"127.0.0.1:{grpc_port}"
        assert "DELF is up: gateway" in output.read_text()
        # the web console: on 127.0.0.1:8080, or a free port when that one is taken, printed
        assert info["web"].startswith("http://127.0.0.1:") and f"web console {info['web']}" in output.read_text()
        with urllib.request.urlopen(info["web"] + "/api/v1/health", timeout=30) as answer:
            assert json.loads(answer.read()) == {"web": "SERVING", "gateway": "SERVING"}

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        _check_ingest_and_search(tmp_path / "photos", grpc_port)
        _check_metrics(metrics_base, output)
        _check_embedded_broker(redis_port, data_dir)

        children = _descendants(proc.pid)
        assert len(children) >= 6, f"expected redis, 3 workers, the gateway and the web service: {children}"
        _stop_and_check_nothing_is_left(proc, children, ready_file, redis_port, report)
    finally:
        if proc.poll() is None:  # the test failed half-way: leave nothing behind
            _kill_everything(proc)
