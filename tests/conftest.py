"""Shared fixtures: a real running system (gateway, Celery workers, Redis, Milvus Lite).

`system` starts the whole system as `make up` does (`python -m delf_tools.launcher`),
in its own processes, on the tests' Redis (a database and queue prefix of its own,
so it never touches other data) and a Milvus Lite file in a temp folder.

The tests' Redis is the one at DELF_TEST_REDIS_URL (default redis://127.0.0.1:6379/14)
when it answers; otherwise the session starts an embedded one (the redis-server `make up`
uses, on a free port, keeping nothing) and stops it at the end, so `make test` needs no
Redis on the machine. Tests reach it through `TEST_REDIS_URL`, or `redis_db_url(n)` for a
database of their own on the same server.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from embedded_redis import EmbeddedRedis

CONFIGURED_REDIS_URL = os.environ.get("DELF_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
STARTUP_TIMEOUT_S = 240

_test_redis: dict[str, object] = {}  # "url": the session's Redis URL, "embedded": its EmbeddedRedis


def redis_db_url(db: int | None = None) -> str:
    """The tests' Redis URL (database `db`, or the configured one): DELF_TEST_REDIS_URL
    when a Redis answers there, else an embedded Redis, started on first use."""
    if "url" not in _test_redis:
        if redis_available(CONFIGURED_REDIS_URL):
            _test_redis["url"] = CONFIGURED_REDIS_URL
        else:
            embedded = EmbeddedRedis().start()
            _test_redis["embedded"] = embedded
            _test_redis["url"] = embedded.url(_db_of(CONFIGURED_REDIS_URL))
    url = str(_test_redis["url"])
    if db is None:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def _db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def __getattr__(name: str) -> str:
    # `from conftest import TEST_REDIS_URL` resolves (and if need be starts) the Redis
    # only in sessions that use it.
    if name == "TEST_REDIS_URL":
        return redis_db_url()
    raise AttributeError(name)


# Fixtures that start processes (the whole system, workers, a gateway, a Milvus server,
# a browser): a test that uses one, directly or through another fixture, is a system test.
SYSTEM_FIXTURES = frozenset({
    "system", "cluster", "ingest_system", "up", "obs", "gateway", "search_limited_gateway",
    "auth_gateway", "tls_gateway", "server_uri", "traced", "browser", "launcher_env",
    "tls_web", "passthrough_web",
})


def pytest_collection_modifyitems(config, items):
    """Two lanes: `-m "not system"` (the fast lane, run first by .ci/run) and `-m system`:
    tests that start processes (`SYSTEM_FIXTURES`), are marked slow, or whose module says
    `pytestmark = pytest.mark.system`."""
    for item in items:
        if SYSTEM_FIXTURES & set(item.fixturenames) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.system)


def pytest_unconfigure(config):
    embedded = _test_redis.pop("embedded", None)
    if embedded is not None:
        embedded.stop()
    _test_redis.pop("url", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_available(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class RunningSystem:
    """The launcher process and what a test needs to talk to it."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.address = env["DELF_GRPC_ADDR"]
        self.http_addr = f"127.0.0.1:{free_port()}"
        self.http_url = f"http://{self.http_addr}"  # the HTTP API and web console (delf_web)
        self.log_path = root / "launcher.log"
        self.ready_file = root / "ready"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "delf_tools.launcher", "--data-dir", self.env["DELF_DATA_DIR"],
             "--grpc-addr", self.address, "--http-addr", self.http_addr, "--ready-file", str(self.ready_file),
             "--console-logs"],  # every service's output in launcher.log, which tests read
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the system exited while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the system was not ready in {STARTUP_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def client(self, timeout: float = 120.0):
        from delf_common.client import DelfClient

        return DelfClient(self.address, timeout=timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        return self.proc.returncode


def system_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
    env.update(
        DELF_REDIS_URL=redis_db_url(),
        DELF_QUEUE_PREFIX=f"delftest-{uuid.uuid4().hex[:8]}",
        DELF_DATA_DIR=str(root / "data"),
        DELF_GRPC_ADDR=f"127.0.0.1:{free_port()}",
        DELF_COLLECTION="delftest",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def system(tmp_path_factory):
    """The whole system, started once for the test session."""
    if not redis_available(redis_db_url()):
        pytest.fail(f"no Redis at {redis_db_url()}")
    root = tmp_path_factory.mktemp("system")
    running = RunningSystem(root, system_env(root, DELF_MAX_IMAGE_BYTES=str(8 * 1024 * 1024),
                                             DELF_INGEST_ROOTS=str(root / "photos")))
    (root / "photos").mkdir()
    running.start()
    yield running
    code = running.stop()
    if code not in (0, None):
        print(f"launcher exited with {code}:\n{running.tail()}")
    shutil.rmtree(root / "data", ignore_errors=True)


@pytest.fixture(scope="session")
def client(system):
    c = system.client()
    yield c
    c.close()
