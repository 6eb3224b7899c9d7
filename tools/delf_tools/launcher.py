"""`delf up`: run the whole system on one machine (the embedded default).

Starts, in this order:

1. a broker: the Redis named by ``DELF_REDIS_URL`` when it is set, otherwise an
   embedded ``redis-server`` on 127.0.0.1 keeping its data (append-only file) in
   ``$DELF_DATA_DIR/redis``, so that queued jobs survive a restart;
2. the Celery workers: extractors, one indexer (Milvus Lite is single-process),
   verifiers;
3. the gRPC gateway;
4. the HTTP/JSON API and web console (`web_child`, unless ``--no-web``).

Before the workers start, tasks a previous run's workers held unacknowledged (a
`delf up` killed with its workers) are handed out again (`orphans`). It prints one
line when the gateway's health check says SERVING and every worker answers a ping
(each worker warms up before it answers), then watches the children. A service that
dies after that is restarted like Docker's ``restart: unless-stopped`` (`restarts`:
backoff, its held tasks handed out again at once, the others keep serving); one that
dies while starting, or in a crash loop, stops everything (exit 1, with its last log
lines). Ctrl-C or SIGTERM stops everything (SIGTERM to each child, SIGKILL after a
grace period, the embedded Redis last) and exits 0.

Each service's output goes to DATA_DIR/logs/<service>.log (``--log-dir``), and its lines
that report a problem to the terminal too; ``--console-logs`` puts all of it on the terminal.
The child processes live in `children`, their output in `logsink`, the embedded
Redis helpers in `broker`, the readiness probe in `readiness`.

Usage: ``delf up [options]`` or ``python -m delf_tools.launcher [options]``.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import IO

from delf_common import config
from delf_tools import logsink, web_child
from delf_tools.broker import embedded_redis_argv, free_port, port_in_use, redacted
from delf_tools.children import Child, ChildSpec, Events
from delf_tools.logsink import LogSink
from delf_tools.logsink import say as _say
from delf_tools.readiness import (LaunchError, Readiness, check_listen_addr, dial_addr, health_tls_roots,
                                   redis_server_path, write_ready_file)
from delf_tools.restarts import Restarter
from delf_tools.up_options import build_parser

STOP_GRACE_S = 15.0        # a child's time to exit after SIGTERM (Celery warm shutdown)
BROKER_WAIT_S = 30.0       # time for the broker to answer a ping
PROGRESS_EVERY_S = 20.0    # how often to say what startup is still waiting for
# The extractor: one process (torch CUDA is not fork-safe) whose threads (2 x
# DELF_WORKER_BATCH, set by delf_extractor.tasks) feed batched forward passes.
EXTRACTOR_POOL_ARGS = ("--pool", "threads", "--prefetch-multiplier", "1")


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
        self.http_addr: str | None = None if getattr(opts, "no_web", False) else opts.http_addr
        self.redis_url: str = ""
        self._lock_file: IO[str] | None = None
        self._ready_file: Path | None = None
        self._started_at = time.monotonic()
        self._extra_env: dict[str, dict[str, str]] = {}  # per child: its metrics port
        self.restarter: Restarter | None = None

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
        check_listen_addr(self.grpc_addr)  # malformed, or another process serves it: fail before starting
        if self.http_addr is not None and web_child.missing():
            _say(f"the web console is not started: {web_child.missing()}")
            self.http_addr = None
        if self.http_addr is not None:
            self.http_addr = web_child.choose_addr(self.http_addr)
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
        log_dir = None  # --console-logs: every service's output on the terminal
        if not self.opts.console_logs:  # else a quiet terminal: problems only, the rest in files
            log_dir = Path(self.opts.log_dir or self.data_dir / "logs").expanduser().resolve()
            log_dir.mkdir(parents=True, exist_ok=True)
            _say(f"logs go to {log_dir}/<service>.log (problems are shown here too)")
        self.opts.log_dir = log_dir
        self.sink = LogSink(log_dir, ["redis"] + [s.name for s in self._service_specs()],
                            json_lines=logsink.json_lines())

        # What every child inherits on top of our environment.
        os.environ["DELF_DATA_DIR"] = str(self.data_dir)
        os.environ["DELF_GRPC_ADDR"] = self.grpc_addr
        os.environ.setdefault("PYTHONUNBUFFERED", "1")

    # broker ----------------------------------------------------------------

    def _start_broker(self) -> None:
        external = os.environ.get("DELF_REDIS_URL", "")
        if external:
            self.redis_url = external
            _say(f"broker: {redacted(external)} (from DELF_REDIS_URL)")
        else:
            port = self.opts.redis_port
            if port == 0:
                port = free_port()
            elif port_in_use(port):
                free = free_port()
                _say(f"port {port} is taken; the embedded Redis uses port {free} instead")
                port = free
            redis_dir = self.data_dir / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            argv = embedded_redis_argv(redis_server_path(), port, redis_dir)
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
                f"the broker {redacted(self.redis_url)} does not answer"
                + (f": {last_error}" if last_error else " (still loading after "
                   f"{BROKER_WAIT_S:.0f} s)")
            )
        finally:
            client.close()

    # services --------------------------------------------------------------

    def _service_specs(self) -> list[ChildSpec]:
        from delf_common.contract import queue_name

        prefix = config.get("DELF_QUEUE_PREFIX")
        host = socket.gethostname()
        py = sys.executable
        common = ["--without-gossip", "--without-mingle"]
        specs: list[ChildSpec] = []
        for i in range(1, self.opts.extractors + 1):
            node = f"extract-{i}"
            specs.append(ChildSpec(node, [
                py, "-m", "celery", "-A", "delf_extractor.tasks", "worker",
                "-Q", queue_name("extract", prefix), *EXTRACTOR_POOL_ARGS,
                *common, "-n", f"{node}@%h"], node=f"{node}@{host}"))
        specs.append(ChildSpec("index", [
            py, "-m", "celery", "-A", "delf_indexer.tasks", "worker",
            "-Q", queue_name("index", prefix), "--pool", "solo",
            *common, "-n", "index@%h"], node=f"index@{host}"))
        for spec in specs:  # the queue each worker consumes: its tasks, should it die
            spec.queues = tuple(spec.argv[spec.argv.index("-Q") + 1].split(",")) if "-Q" in spec.argv else ()
        for i in range(1, self.opts.verifiers + 1):
            node = "verify" if self.opts.verifiers == 1 else f"verify-{i}"
            specs.append(ChildSpec(node, [
                py, "-m", "celery", "-A", "delf_verifier.tasks", "worker",
                "-Q", queue_name("verify", prefix), "--pool", "threads", "--concurrency", "2",
                *common, "-n", f"{node}@%h"], node=f"{node}@{host}"))
        specs.append(ChildSpec("gateway", [py, "-m", "delf_gateway"]))
        if self.http_addr is not None:
            specs.append(web_child.spec())
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
        if base:  # the web service (last) serves no /metrics of its own
            _say("metrics: " + ", ".join(f"{s.name} :{base + i}" for i, s in enumerate(specs)
                                         if s.name != web_child.NAME))
        self._restore_tasks({q for s in specs for q in s.queues}, ask_workers=self.redis is None,
                            why="the workers of a previous run held when they stopped")
        self._started_at = time.monotonic()
        for i, spec in enumerate(specs):
            metered = base and spec.name != web_child.NAME
            self._extra_env[spec.name] = {"DELF_METRICS_PORT": str(base + i)} if metered else {}
            if spec.name == web_child.NAME and self.http_addr is not None:
                self._extra_env[spec.name].update(web_child.env(self.http_addr, self.grpc_addr))
            self.children.append(self._spawn(spec, self._extra_env[spec.name]))

    def _restore_tasks(self, queues: set[str], ask_workers: bool, why: str,
                       exclude: set[str] = frozenset()) -> None:
        """Hands out again the unacknowledged tasks of `queues` no live worker holds, and parked index tasks."""
        from delf_common.celery_app import make_app
        from delf_tools.orphans import hand_out_again

        if not queues:
            return
        app = make_app("delf-up")
        try:
            n = hand_out_again(app, queues, ask_workers=ask_workers, exclude=exclude)
        except Exception as exc:  # noqa: BLE001 - they still come back after the visibility timeout
            _say(f"could not look for tasks {why}: {exc}")
            return
        finally:
            app.close()
        if n:
            _say(f"handed out again {n} task{'s' if n != 1 else ''} {why}")

    # supervision -----------------------------------------------------------

    def _supervise(self) -> int:
        """Wait until ready, then until a signal (exit 0) or a child's death (exit 1)."""
        probe = Readiness(dial_addr(self.grpc_addr), health_tls_roots())
        self.restarter = Restarter(self._respawn, self._restore_held, lambda c: self._is_back(probe, c))
        waiting_nodes = {c.spec.node for c in self.children if c.spec.node}
        waiting_nodes |= {web_child.NAME} if self.http_addr is not None else set()
        gateway_ready = False
        ready = False
        started = self._started_at
        deadline = started + self.opts.ready_timeout
        next_progress = started + PROGRESS_EVERY_S
        try:
            while True:
                event = self._next_event(self.restarter.timeout(0.5 if not ready else 3600.0))
                if self.stop_signal is not None:
                    _say(f"{signal.Signals(self.stop_signal).name} received, stopping")
                    return 0
                if event and event[0] == "exit":
                    child: Child = event[1]  # type: ignore[assignment]
                    if not ready or self.opts.no_restart or not self.restarter.child_died(child):
                        _say(str(self._child_died(child)))
                        return 1
                self.restarter.tick()
                if ready:
                    continue

                if not gateway_ready:
                    gateway_ready = probe.gateway_serving()
                if web_child.NAME in waiting_nodes and web_child.serving(self.http_addr):
                    waiting_nodes.discard(web_child.NAME)
                if waiting_nodes - {web_child.NAME}:
                    waiting_nodes -= probe.answering(waiting_nodes - {web_child.NAME})
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
            probe.close()

    def _respawn(self, spec: ChildSpec) -> Child:
        child = self._spawn(spec, self._extra_env.get(spec.name))
        if self.redis is not None and spec.name == self.redis.name:
            self.redis = child
        else:
            self.children = [child if c.name == spec.name else c for c in self.children]
        return child

    def _restore_held(self, dead: Child) -> None:
        if dead.spec.queues:
            self._restore_tasks(set(dead.spec.queues), ask_workers=True, why=f"{dead.name} held when it died",
                                exclude={dead.spec.node} if dead.spec.node else set())

    def _is_back(self, probe: Readiness, child: Child) -> bool:
        if child.spec.node:
            return bool(probe.answering({child.spec.node}))
        if child.name == "gateway":
            return probe.gateway_serving()
        if child.name == web_child.NAME and self.http_addr is not None:
            return web_child.serving(self.http_addr)
        return True

    def _announce_ready(self, elapsed: float) -> None:
        info = {
            "gateway": dial_addr(self.grpc_addr),
            "grpc_addr": self.grpc_addr,
            "redis_url": redacted(self.redis_url),
            "data_dir": str(self.data_dir),
            "pid": os.getpid(),
            "web": web_child.url(self.http_addr) if self.http_addr is not None else None,
            "children": {c.name: c.pid for c in self.children + ([self.redis] if self.redis else [])},
        }
        if self._ready_file is not None:
            write_ready_file(self._ready_file, info)
        _say(f"all {len(self.children)} services ready after {elapsed:.1f} s")
        if self.sink is not None:
            self.sink.show_warnings = True  # from now on a warning is news, not startup
        gateway = dial_addr(self.grpc_addr)
        web = f", web console {web_child.url(self.http_addr)}" if self.http_addr is not None else ""
        if gateway != config.get("DELF_GATEWAY"):
            _say(f"clients: export DELF_GATEWAY={gateway}")
        if logsink.json_lines():
            from delf_common import logs

            print(logs.json_line("up", f"DELF is up: gateway {gateway}{web}", "INFO", gateway=gateway,
                                 web=web_child.url(self.http_addr) if web else None), flush=True)
        else:
            print(f"DELF is up: gateway {gateway}{web} (Ctrl-C to stop)", flush=True)

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
    try:
        logsink.use_json_lines(config.get("DELF_LOG_FORMAT") == "json")
        from delf_common import logs

        logs.parse_level(config.get("DELF_LOG_LEVEL"))  # every child would fail on it
    except config.ConfigError as exc:
        _say(f"error: {exc}")
        return 2
    return Launcher(opts).run()


if __name__ == "__main__":
    sys.exit(main(prog="python -m delf_tools.launcher"))
