"""Errors of the HTTP API: one JSON shape, gRPC status codes mapped to HTTP statuses.

Every error answers ``{"error": {"code": <gRPC status name>, "message": <text>}}``; the
message is the gateway's own (the limits and wording of delf_common.contract), so the
HTTP API and the gRPC API say the same thing about the same input.
"""
from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

# The mapping of google.rpc.Code to HTTP (google/rpc/code.proto), except
# RESOURCE_EXHAUSTED: 429 (the gateway's queues are full: retry later); a photo over
# the size limit is refused before it reaches the gateway with 413.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 502,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 502,   # the gateway failed: this service is a gateway to it (502, not 500)
    "UNAVAILABLE": 503,
    "DATA_LOSS": 502,
}


class ApiError(Exception):
    """An answer other than 200: a gRPC status name, the HTTP status and a message."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else HTTP_STATUS.get(code, 502)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"code": self.code, "message": self.message}},
                            status_code=self.status, headers=headers)


def bad_request(message: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message)


def from_rpc_error(exc: grpc.RpcError) -> ApiError:
    """The ApiError that says what the gateway said."""
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", "UNKNOWN") or "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else None
    if name == "UNAVAILABLE" and not details:
        details = "the gateway is unavailable"
    if name == "UNIMPLEMENTED":
        details = f"the gateway does not implement this call yet ({details or 'UNIMPLEMENTED'})"
    return ApiError(name, details or name)
