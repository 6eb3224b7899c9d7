"""Where `delf up`'s output goes: its own messages (`say`, on stderr) and its children's
output (`LogSink`: the terminal with a name prefix, or one file per child; JSON lines
with DELF_LOG_FORMAT=json)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterable

_JSON_LOGS = False  # DELF_LOG_FORMAT=json: every line the launcher writes is a JSON object


def use_json_lines(on: bool) -> None:
    """Set once by `delf up` from DELF_LOG_FORMAT, before anything is said."""
    global _JSON_LOGS
    _JSON_LOGS = on


def json_lines() -> bool:
    return _JSON_LOGS


def say(message: str, level: str = "INFO") -> None:
    """A message of the launcher itself (children's output goes to stdout)."""
    with contextlib.suppress(OSError, ValueError):
        if _JSON_LOGS:
            from delf_common import logs

            print(logs.json_line("up", message, level), file=sys.stderr, flush=True)
        else:
            print(f"delf up: {message}", file=sys.stderr, flush=True)


# A line of a child's output that reports a problem: a log record at WARNING or above (the
# services' text format, Celery's "[...: WARNING/...]", Redis' "# WARNING"), within its start.
_ERRORS = ("ERROR", "CRITICAL", "FATAL")
_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL|FATAL)\b")


def is_problem(line: str, warnings: bool = True) -> bool:
    """Whether a child's output line reports a problem (a JSON line: by its level);
    `warnings`: WARNING lines count, else only errors."""
    levels = _ERRORS + (("WARNING",) if warnings else ())
    stripped = line.strip()
    if stripped.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(stripped).get("level", "")).upper() in levels
    found = _LEVEL.search(line[:80])
    return found is not None and found.group(1) in levels


class LogSink:
    """Where children's output goes: the terminal, prefixed with the child's name,
    or one file per child, and then the lines reporting a problem (`is_problem`) on the
    terminal too (stderr), so that a quiet terminal still shows what goes wrong: errors
    always, warnings once `show_warnings` is set (`delf up` sets it when the system is
    ready: while it starts, the gateway warns that the workers it waits for are not up). With `json_lines` (DELF_LOG_FORMAT=json) every line is a JSON
    object: the services' own log lines pass unchanged (they name their service), other
    output (Celery's banner, Redis, a traceback on stderr) is wrapped in one, and the
    terminal gets no name prefix."""

    def __init__(self, log_dir: Path | None, names: Iterable[str], json_lines: bool = False) -> None:
        self.log_dir = log_dir
        self.json_lines = json_lines
        self._lock = threading.Lock()
        self._width = max((len(n) for n in names), default=8)
        self._files: dict[str, IO[str]] = {}
        self.show_warnings = False
        color = log_dir is None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self._colors: dict[str, str] = {}
        if color:
            palette = ["36", "33", "35", "32", "34", "91", "96", "93"]
            self._colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}

    def path(self, name: str) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"{name}.log"

    def open(self, name: str) -> None:
        path = self.path(name)
        if path is not None:
            f = open(path, "a", encoding="utf-8", buffering=1)
            f.write(f"----- {time.strftime('%Y-%m-%d %H:%M:%S')} delf up started {name} -----\n")
            self._files[name] = f

    def write(self, name: str, line: str) -> None:
        if self.json_lines:
            line = self._as_json(name, line)
            if line is None:
                return
        with self._lock:
            try:
                if self.json_lines and name not in self._files:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                elif name in self._files:
                    self._files[name].write(line + "\n")
                    if is_problem(line, self.show_warnings):
                        sys.stderr.write(line + "\n" if self.json_lines else f"{name} | {line}\n")
                        sys.stderr.flush()
                else:
                    label = name.ljust(self._width)
                    if name in self._colors:
                        label = f"\033[{self._colors[name]}m{label}\033[0m"
                    sys.stdout.write(f"{label} | {line}\n")
                    sys.stdout.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not stop us from draining the pipe

    @staticmethod
    def _as_json(name: str, line: str) -> str | None:
        stripped = line.strip()
        if not stripped:
            return None
        if stripped.startswith("{") and stripped.endswith("}"):
            try:
                if isinstance(json.loads(stripped), dict):
                    return stripped
            except ValueError:
                pass
        from delf_common import logs

        return logs.json_line(name, line.rstrip(), "INFO", stream="output")

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                with contextlib.suppress(OSError):
                    f.close()
            self._files.clear()
