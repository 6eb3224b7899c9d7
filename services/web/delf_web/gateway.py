"""The one connection from this service to the gateway's gRPC API.

The caller's bearer token (``Authorization`` header) and request id travel with each
call as gRPC metadata, so the gateway decides what the token may do; with TLS on the
gateway (``DELF_TLS_CA``) the channel is a TLS one (delf_common.client).
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from delf_common.client import DelfClient
from delf_web.errors import ApiError, from_rpc_error

CALL_TIMEOUT_S = 300.0


class Gateway:
    def __init__(self, target: str):
        self.client = DelfClient(target, timeout=CALL_TIMEOUT_S, token="")
        self.stub = self.client.stub
        self.health = health_pb2_grpc.HealthStub(self.client.channel)

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, request, metadata: list[tuple[str, str]], timeout: float | None = CALL_TIMEOUT_S):
        """The reply of one unary RPC, or ApiError with the gateway's status and message."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def stream_in(self, method: str, items, metadata: list[tuple[str, str]]):
        """The reply of a client-streaming RPC (StartIngestJob)."""
        try:
            return getattr(self.stub, method)(iter(items), timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def stream_out(self, method: str, request, metadata: list[tuple[str, str]], timeout: float | None = None):
        """The call object of a server-streaming RPC (WatchJob): iterate it, cancel it."""
        return getattr(self.stub, method)(request, metadata=metadata, timeout=timeout)

    def serving(self) -> tuple[bool, str]:
        """(the gateway's health check says SERVING, its status name or the error)."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def call_metadata(authorization: str | None, request_id: str | None) -> list[tuple[str, str]]:
    """The gRPC metadata that carries an HTTP request's credentials and request id."""
    metadata = []
    if authorization:
        metadata.append(("authorization", authorization))
    if request_id:
        metadata.append(("x-request-id", request_id))
    return metadata


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ApiError("INVALID_ARGUMENT", message)
