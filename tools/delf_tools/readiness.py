"""How `delf up` knows the system is ready: the gateway's gRPC health check says SERVING
and every Celery worker node answers a control ping."""
from __future__ import annotations

import contextlib


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
        except Exception:  # the broker hiccups: try again on the next round
            return set()
        answered: set[str] = set()
        for reply in replies:
            answered.update(reply)
        return answered & nodes

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.app.close()
