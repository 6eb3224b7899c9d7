"""What `delf up` does when a service dies after startup: what Docker's
``restart: unless-stopped`` does, with a crash-loop limit.

The dead child's leftovers (its process group: e.g. the Milvus Lite server of the
indexer, which holds the data file) are killed, the tasks it held are handed out again
at once (`delf_tools.orphans`), and it is started again after a backoff (1 s, then 2, 4,
8, ... at most 30 s) while the others keep serving. A service that dies
`MAX_RESTARTS` times within `CRASH_WINDOW_S` is in a crash loop: `delf up` gives up
and stops everything, as it does for a service that dies while starting.
"""
from __future__ import annotations

import collections
import signal
import time
from typing import Callable

from delf_tools.children import Child, ChildSpec
from delf_tools.logsink import say as _say

MAX_RESTARTS = 5           # restarts of one service within CRASH_WINDOW_S ...
CRASH_WINDOW_S = 120.0     # ... beyond which it is a crash loop
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
TAIL_SHOWN = 8             # last log lines of a dead service shown with its restart


class RestartPolicy:
    """unless-stopped: restart, with exponential backoff, until a crash loop."""

    def __init__(self, max_restarts: int = MAX_RESTARTS, window_s: float = CRASH_WINDOW_S):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._history: dict[str, collections.deque[float]] = {}

    def delay(self, name: str, now: float) -> float | None:
        """Seconds to wait before restarting `name`, which died at `now`; None: a crash loop."""
        history = self._history.setdefault(name, collections.deque())
        while history and now - history[0] > self.window_s:
            history.popleft()
        if len(history) >= self.max_restarts:
            return None
        history.append(now)
        return min(BACKOFF_FIRST_S * 2 ** (len(history) - 1), BACKOFF_MAX_S)

    def count(self, name: str) -> int:
        return len(self._history.get(name, ()))


class Restarter:
    """Schedules the restarts of dead children and says when each is back.

    `spawn(spec, name)` starts a child again; `restore(child)` hands out the tasks it held;
    `is_back(child)` says whether a restarted child serves again (polled)."""

    def __init__(self, spawn: Callable[[ChildSpec], Child], restore: Callable[[Child], None],
                 is_back: Callable[[Child], bool], policy: RestartPolicy | None = None):
        self.policy = policy or RestartPolicy()
        self._spawn = spawn
        self._restore = restore
        self._is_back = is_back
        self._due: dict[str, tuple[float, ChildSpec]] = {}     # name -> (when, spec)
        self._died_at: dict[str, float] = {}
        self._recovering: dict[str, Child] = {}                # restarted, not serving yet
        self.recovered: list[tuple[str, float]] = []           # (name, seconds from death to back)

    def child_died(self, child: Child) -> bool:
        """Schedules `child`'s restart; False: it is in a crash loop (give up)."""
        now = time.monotonic()
        delay = self.policy.delay(child.name, now)
        child.flush_output()
        if delay is None:
            _say(f"{child.name} stopped unexpectedly ({child.describe_exit()}) for the "
                 f"{self.policy.max_restarts + 1}th time within {self.policy.window_s:.0f} s: "
                 f"a crash loop, giving up")
            return False
        _say(f"{child.name} stopped unexpectedly ({child.describe_exit()}); restarting it in "
             f"{delay:.0f} s (restart {self.policy.count(child.name)} of at most "
             f"{self.policy.max_restarts} within {self.policy.window_s:.0f} s); the others keep serving")
        for line in list(child.tail)[-TAIL_SHOWN:]:
            _say(f"  {child.name}| {line}")
        _clear_group(child)
        try:
            self._restore(child)
        except Exception as exc:  # noqa: BLE001 - its tasks still come back after the visibility timeout
            _say(f"could not hand out the tasks {child.name} held: {exc}")
        self._died_at[child.name] = now
        self._due[child.name] = (now + delay, child.spec)
        self._recovering.pop(child.name, None)
        return True

    def timeout(self, idle: float) -> float:
        """How long the launcher may wait for the next event."""
        if self._recovering:
            idle = min(idle, 0.5)
        if self._due:
            idle = min(idle, max(min(t for t, _ in self._due.values()) - time.monotonic(), 0.0))
        return idle

    def tick(self) -> list[Child]:
        """Starts the children whose restart is due (returned); reports those back in service."""
        now = time.monotonic()
        started = []
        for name, (when, spec) in list(self._due.items()):
            if when <= now:
                del self._due[name]
                child = self._spawn(spec)
                _say(f"{name} restarted (pid {child.pid})")
                self._recovering[name] = child
                started.append(child)
        for name, child in list(self._recovering.items()):
            if self._is_back(child):
                del self._recovering[name]
                took = time.monotonic() - self._died_at[name]
                self.recovered.append((name, took))
                _say(f"{name} is serving again, {took:.1f} s after it died")
        return started


def _clear_group(child: Child, grace_s: float = 3.0) -> None:
    """Ends what the dead child left running in its process group (e.g. the Milvus Lite
    server, which would keep the data file from the restarted indexer)."""
    if not child.group_alive():
        return
    child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while child.group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if child.group_alive():
        child.signal_group(signal.SIGKILL)
