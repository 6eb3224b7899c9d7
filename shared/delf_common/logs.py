"""Logging of every service: text for people or one JSON object per line, with request ids.

``DELF_LOG_FORMAT=text`` (the default) prints ``time LEVEL logger: message`` and, when
known, ``[request_id=... job_id=...]``; ``json`` prints one object per line::

    {"ts": "2026-11-26T18:30:00.123Z", "level": "INFO", "service": "gateway",
     "logger": "delf.gateway", "message": "...", "request_id": "...", ...}

The ids (``request_id``, ``job_id``, ``image_id``, ``task_id``) live in context
variables: the gateway binds the request id of each call (``x-request-id`` metadata or a
new one), `delf_common.celery_app` copies the bound ids into the headers of every task
it publishes and binds them again in the worker while the task runs, so one search or
ingest job can be followed through every service's logs. Extra fields given with
``log.info(..., extra={"method": "Search"})`` are added to the JSON object.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import re
import sys
import uuid
from typing import IO, Iterator

from delf_common import config

ID_FIELDS = ("request_id", "job_id", "image_id", "task_id")
_VARS: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"delf_{name}", default=None) for name in ID_FIELDS
}

REQUEST_ID_HEADER = "x-request-id"
# What a caller may send as its request id; anything else is replaced by a new id.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_MAX_ID_CHARS = 512  # ids (job, image) are cut to this in log lines

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName", "color_message",
    "data",  # Celery's own structured copy of its message (with argument reprs): left out
}


# --------------------------------------------------------------------------- context


def current() -> dict[str, str]:
    """The ids bound in this context (only those that are set)."""
    out = {}
    for name, var in _VARS.items():
        value = var.get()
        if value:
            out[name] = value
    return out


def bind(**ids: object) -> list[tuple[str, contextvars.Token]]:
    """Bind ids (None or "" leaves one unchanged); returns tokens for `unbind`."""
    tokens = []
    for name, value in ids.items():
        if name not in _VARS:
            raise KeyError(f"unknown log id {name!r}; expected one of {ID_FIELDS}")
        if value is None or value == "":
            continue
        tokens.append((name, _VARS[name].set(str(value)[:_MAX_ID_CHARS])))
    return tokens


def unbind(tokens: list[tuple[str, contextvars.Token]]) -> None:
    for name, token in reversed(tokens):
        with contextlib.suppress(ValueError, RuntimeError):  # token from another context
            _VARS[name].reset(token)


def clear() -> None:
    """Unset every id (a worker between tasks)."""
    for var in _VARS.values():
        var.set(None)


@contextlib.contextmanager
def bound(**ids: object) -> Iterator[None]:
    tokens = bind(**ids)
    try:
        yield
    finally:
        unbind(tokens)


def new_request_id() -> str:
    return uuid.uuid4().hex


def clean_request_id(value: object) -> str | None:
    """`value` when it is an acceptable request id (1-128 of letters, digits and ._:/+=@-)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and _REQUEST_ID_RE.match(value):
        return value
    return None


# --------------------------------------------------------------------------- formatting


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record (unless the record already carries one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                value = var.get()
                if value:
                    setattr(record, name, value)
        return True


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and value != value:  # NaN is not JSON
            return None
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, service, logger, message, ids, extras."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        try:
            message = record.getMessage()
        except Exception as exc:  # noqa: BLE001 - a bad format string must not lose the line
            message = f"{record.msg!r} (unformattable: {exc})"
        obj: dict[str, object] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": message,
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value:
                obj[name] = str(value)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in obj and key not in ID_FIELDS and not key.startswith("_"):
                obj[key] = _jsonable(value)
        if record.processName not in (None, "MainProcess"):
            obj["process"] = record.processName
        if record.process:
            obj["pid"] = record.process
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request_id=... job_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [f"{name}={getattr(record, name)}" for name in ID_FIELDS if getattr(record, name, None)]
        if not ids:
            return text
        first, sep, rest = text.partition("\n")  # ids on the message line, before a traceback
        return f"{first} [{' '.join(ids)}]{sep}{rest}"


# --------------------------------------------------------------------------- setup

_service = "delf"


def service_name() -> str:
    return _service


def formatter(service: str, fmt: str | None = None) -> logging.Formatter:
    fmt = fmt or config.get("DELF_LOG_FORMAT")
    return JsonFormatter(service) if fmt == "json" else TextFormatter()


def parse_level(level: object) -> int:
    if isinstance(level, int):
        return level
    text = str(level).strip().upper()
    value = logging.getLevelName(text)
    if isinstance(value, int):
        return value
    if text.isdigit():
        return int(text)
    raise config.ConfigError(f"DELF_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")


def setup(service: str, level: object = None, fmt: str | None = None,
          stream: IO[str] | None = None) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) in DELF_LOG_FORMAT at DELF_LOG_LEVEL.

    Replaces a handler installed by an earlier call; leaves other handlers alone.
    Returns the handler."""
    global _service
    _service = service
    level = parse_level(config.get("DELF_LOG_LEVEL") if level is None else level)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_delf_handler", False):
            root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._delf_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter(service, fmt))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler


def json_line(service: str, message: str, level: str = "INFO", **fields: object) -> str:
    """A log line in the JSON format for text that did not come through `logging`
    (the launcher wraps its children's plain output with it)."""
    record = logging.LogRecord(service, getattr(logging, level, logging.INFO), "", 0, message, None, None)
    record.process = None
    record.processName = None
    for key, value in fields.items():
        setattr(record, key, value)
    return JsonFormatter(service).format(record)
