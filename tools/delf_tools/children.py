"""The processes `delf up` runs: each child in its own process group with its output
pumped to a `LogSink` (and its last lines kept for when it dies), and `Events`, the one
queue of stop signals and child exits the launcher's main thread waits on."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from delf_tools.logsink import LogSink

TAIL_LINES = 40            # log lines kept per child, shown when it dies


@dataclasses.dataclass
class ChildSpec:
    name: str               # shown in the logs, e.g. "extract-1"
    argv: list[str]
    node: str | None = None  # Celery node name that must answer a ping, e.g. "index@host"
    queues: tuple[str, ...] = ()  # the queues it consumes (its held tasks, should it die)


class Child:
    """One running process, in its own process group, with its output pumped to a sink."""

    def __init__(self, spec: ChildSpec, env: dict[str, str], sink: "LogSink",
                 events: "Events") -> None:
        self.spec = spec
        self.name = spec.name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exited = threading.Event()
        self.proc = subprocess.Popen(
            spec.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches only the launcher,
            # which then stops the children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self._sink = sink
        self._events = events
        self._pump_thread = threading.Thread(target=self._pump, name=f"log-{self.name}", daemon=True)
        self._pump_thread.start()
        threading.Thread(target=self._wait, name=f"wait-{self.name}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.tail.append(line)
                self._sink.write(self.name, line)

    def _wait(self) -> None:
        self.proc.wait()
        self.exited.set()
        self._events.child_exited(self)

    def flush_output(self, timeout: float = 1.0) -> None:
        """Give the log pump a moment to pass on the last lines of an exited child."""
        self._pump_thread.join(timeout)

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def signal_leader(self, sig: int) -> None:
        if not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Signal the child's whole process group (it and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


# Resolved here, not in the child: between fork and exec only this call runs.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: a child gets SIGTERM when the launcher itself dies (SIGKILL, OOM), so
    that no worker outlives it."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class Events:
    """What the main thread waits for: stop signals and children's exits.

    A signal may be delivered to any thread (log pumps, gRPC's, ...), and a Python
    handler only runs once the main thread executes bytecode again; so signals are
    read from the wakeup fd instead, which wakes the main thread's `select` at once.
    Child exits are queued by their waiter threads, which write to the same pipe."""

    _CHILD = 0  # the byte a child exit writes; signals write their number

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._queue: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._signals: collections.deque[int] = collections.deque()
        self._handlers: dict[int, object] = {}
        self._old_wakeup_fd: int | None = None
        self._closed = False
        self._write_lock = threading.Lock()

    def catch_signals(self, signals: Iterable[int]) -> None:
        """Must be called from the main thread."""
        self._old_wakeup_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in signals:
            # The handler itself does nothing: the wakeup fd carries the signal.
            self._handlers[sig] = signal.signal(sig, lambda *_: None)

    def child_exited(self, child: "Child") -> None:
        """Called from a child's waiter thread."""
        self._queue.put(("exit", child))
        with self._write_lock, contextlib.suppress(BlockingIOError):
            if not self._closed:
                os.write(self._w, bytes([self._CHILD]))

    def get(self, timeout: float) -> tuple[str, object] | None:
        """The next ("signal", signum) or ("exit", child), or None after `timeout` s."""
        if not self._signals and self._queue.empty():
            select.select([self._r], [], [], max(timeout, 0.0))
            with contextlib.suppress(BlockingIOError):
                while data := os.read(self._r, 512):
                    self._signals.extend(b for b in data if b != self._CHILD)
        if self._signals:
            return "signal", self._signals.popleft()
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        with self._write_lock:
            self._closed = True
            os.close(self._r)
            os.close(self._w)
