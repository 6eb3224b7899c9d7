"""A `delf up` of a test's own, as a user runs it: embedded Redis (its own port, its data
in the data dir), Milvus Lite, one service per kind, each service's log in
DATA_DIR/logs; settings tuned by the test. It can be killed (-9) and started again
on the same data dir, and its workers found and killed one by one.

Used by tests/test_healing.py (items 5, 6 of issue 14) and tests/test_warmup.py (item 8)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from photos import SAMPLE_PHOTOS, jpeg, random_crop, sample_photo

READY_TIMEOUT_S = 300
# The Celery worker of each kind, as `ps` shows it, and its name in the launcher's log.
WORKER_MODULES = {"extractor": ("delf_extractor.tasks", "extract-1"),
                  "indexer": ("delf_indexer.tasks", "index"),
                  "verifier": ("delf_verifier.tasks", "verify")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_photos(n: int, seed: int = 11) -> list[tuple[str, bytes]]:
    """`n` small distinct JPEGs: crops of the sample photos."""
    import cv2

    rng = np.random.default_rng(seed)
    sources = [sample_photo(name) for name in SAMPLE_PHOTOS]
    out = []
    for i in range(n):
        crop = random_crop(sources[i % len(sources)], rng, 0.5, 0.9)
        side = int(rng.integers(220, 300))
        scale = side / max(crop.shape[:2])
        small = cv2.resize(crop, (max(64, int(crop.shape[1] * scale)), max(64, int(crop.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        out.append((f"h{i:03d}", jpeg(small, quality=88)))
    return out


class UpSystem:
    """`python -m delf_tools.launcher` on `root`/data with the embedded Redis."""

    def __init__(self, root: Path, **settings: str):
        self.root = root
        self.data_dir = root / "data"
        self.grpc_addr = f"127.0.0.1:{free_port()}"
        self.redis_port = free_port()
        self.ready_file = root / "ready.json"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
        self.env.update(PYTHONUNBUFFERED="1", DELF_DEVICE="cpu", DELF_COLLECTION="heal", **settings)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def output(self) -> Path:
        return self.root / f"launcher-{self.starts}.out"

    def start(self, wait: bool = True) -> float:
        """Starts it; with `wait`, until ready. Returns the seconds to ready."""
        self.starts += 1
        self.ready_file.unlink(missing_ok=True)
        began = time.monotonic()
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "delf_tools.launcher", "--data-dir", str(self.data_dir),
                 "--grpc-addr", self.grpc_addr, "--redis-port", str(self.redis_port),
                 "--ready-file", str(self.ready_file), "--log-dir"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        if wait:
            self.wait_ready(began)
        return time.monotonic() - began

    def wait_ready(self, began: float) -> None:
        deadline = began + READY_TIMEOUT_S
        while not self.ready_file.exists():
            assert self.proc.poll() is None, f"launcher exited with {self.proc.returncode}\n{self.report()}"
            assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S} s\n{self.report()}"
            time.sleep(0.3)

    def pids(self) -> dict[str, int]:
        return json.loads(self.ready_file.read_text())["children"]

    def worker_pid(self, kind: str) -> int:
        """The pid of the running worker of `kind` (extractor, indexer, verifier), from /proc."""
        module = WORKER_MODULES[kind][0]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if module.encode() in cmd and self._below_launcher(stat):
                return int(entry.name)
        raise AssertionError(f"no running {kind} under the launcher\n{self.report()}")

    def _below_launcher(self, stat: str) -> bool:
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        return ppid == self.proc.pid and stat.rsplit(")", 1)[1].split()[0] != "Z"

    def client(self, timeout: float = 120.0):
        from delf_common.client import DelfClient

        return DelfClient(self.grpc_addr, timeout=timeout)

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def report(self, lines: int = 40) -> str:
        text = f"launcher output:\n{self.log()[-6000:]}"
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            text += f"\n--- {log.name} (last lines) ---\n" + "\n".join(tail)
        return text

    def kill_all(self) -> None:
        """kill -9 of the launcher (its children get SIGTERM from the kernel, as on Linux
        they do when `delf up` dies), then wait for every child to be gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = _descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.kill_all()
            return None


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
