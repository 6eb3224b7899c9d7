"""Container healthcheck: exit 0 when the gateway's gRPC health service says SERVING.

    python -m delf_gateway.healthcheck [host:port] [--service NAME] [--all] [--timeout S]
                                       [--tls-ca PEM] [--server-name NAME]

Without an address it asks the gateway of this container: 127.0.0.1 on the port of
``DELF_GRPC_ADDR``. It calls ``grpc.health.v1.Health/Check`` for the overall server
(service name ``""``: SERVING while every dependency in ``DELF_HEALTH_REQUIRE`` is up)
unless ``--service`` names another: ``delf.v1.ImageSearch`` (the same), or one
dependency: ``redis``, ``extractor``, ``indexer``, ``verifier`` (a worker of that service
has a live heartbeat), ``milvus`` (an indexer reaches it). ``--all`` also prints each
dependency's status. Exit codes: 0 SERVING, 1 anything else (NOT_SERVING, unreachable,
timeout).

The health service needs no token, even when the gateway requires one. When the gateway
serves TLS (``DELF_TLS_CERT`` is set, as in the gateway's own container) the check does
too, trusting ``--tls-ca``, else ``DELF_TLS_CA``, else the gateway's own certificate
``DELF_TLS_CERT`` (right for a self-signed one). ``--server-name`` overrides the name the
certificate must carry when it names neither 127.0.0.1 nor the address dialled.
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from delf_common import config
from delf_gateway.settings import HealthcheckSettings


def local_target(addr: str) -> str:
    """127.0.0.1 (or [::1]) on the port the gateway binds (`addr`, e.g. ``0.0.0.0:50051``)."""
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


def tls_roots(settings: HealthcheckSettings, tls_ca: str | None = None) -> tuple[str, str] | None:
    """(setting, PEM path) to trust when the check must use TLS; None for plaintext."""
    if tls_ca:
        return "--tls-ca", tls_ca
    if settings.tls_ca:
        return "DELF_TLS_CA", settings.tls_ca
    if settings.tls_cert:
        return "DELF_TLS_CERT", settings.tls_cert
    return None


def _channel(target: str, roots: tuple[str, str] | None, server_name: str | None) -> grpc.Channel:
    if roots is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=config.read_pem(*roots))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


DEPENDENCIES = ("redis", "extractor", "indexer", "verifier", "milvus")


def check(target: str, service: str = "", timeout: float = 3.0, tls_ca: str | None = None,
          server_name: str | None = None, tls: bool | None = None, show_all: bool = False) -> int:
    """`tls`: None decides from the settings (see the module doc), False forces plaintext.
    `show_all`: also print the status of each dependency."""
    try:
        roots = tls_roots(HealthcheckSettings.from_env(), tls_ca) if tls is not False else None
        channel = _channel(target, roots, server_name)
    except config.ConfigError as exc:
        print(f"unhealthy: {target}: {exc}", file=sys.stderr)
        return 1
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        if show_all:
            for name in DEPENDENCIES:
                try:
                    dep = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout).status
                    text = health_pb2.HealthCheckResponse.ServingStatus.Name(dep)
                except grpc.RpcError as exc:
                    text = exc.code().name
                print(f"  {name}: {text}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {status}")
        return 0
    print(f"unhealthy: {target}: {status}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m delf_gateway.healthcheck", description=__doc__)
    parser.add_argument("target", nargs="?", help="host:port (default: this container's gateway)")
    parser.add_argument("--service", default="",
                        help="service name to check (default: the server); also delf.v1.ImageSearch, "
                             "redis, extractor, indexer, verifier, milvus")
    parser.add_argument("--all", action="store_true", dest="show_all",
                        help="also print the status of each dependency")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="use TLS trusting this PEM (default: $DELF_TLS_CA, else $DELF_TLS_CERT; "
                             "plaintext when neither is set)")
    parser.add_argument("--server-name", default=None,
                        help="host name the gateway's certificate must carry (default: the target's)")
    args = parser.parse_args(argv)
    return check(args.target or local_target(HealthcheckSettings.from_env().grpc_addr), args.service, args.timeout,
                 tls_ca=args.tls_ca, server_name=args.server_name, show_all=args.show_all)


if __name__ == "__main__":
    sys.exit(main())
