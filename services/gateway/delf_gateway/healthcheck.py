"""Container healthcheck: exit 0 when the gateway's gRPC health service says SERVING.

    python -m delf_gateway.healthcheck [host:port] [--service NAME] [--timeout S]

Without an address it asks the gateway of this container: 127.0.0.1 on the port of
``DELF_GRPC_ADDR``. It calls ``grpc.health.v1.Health/Check`` for the overall server
(service name ``""``) unless ``--service`` names another. Exit codes: 0 SERVING,
1 anything else (NOT_SERVING, unreachable, timeout).
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from delf_common import config


def local_target(addr: str | None = None) -> str:
    """127.0.0.1 (or [::1]) on the port the gateway binds, e.g. ``0.0.0.0:50051``."""
    addr = addr if addr is not None else config.get("DELF_GRPC_ADDR")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        port = "50051"
    if host.startswith("[") and host not in ("[::]", "[::0]"):
        return f"{host}:{port}"  # a specific IPv6 address
    if host.startswith("["):
        return f"[::1]:{port}"
    if host in ("", "0.0.0.0", "localhost"):
        return f"127.0.0.1:{port}"
    return f"{host}:{port}"


def check(target: str, service: str = "", timeout: float = 3.0) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {status}")
        return 0
    print(f"unhealthy: {target}: {status}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m delf_gateway.healthcheck", description=__doc__)
    parser.add_argument("target", nargs="?", help="host:port (default: this container's gateway)")
    parser.add_argument("--service", default="", help="service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    return check(args.target or local_target(), args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
