"""Malformed request bodies answer INVALID_ARGUMENT, not INTERNAL.

gRPC Python ends a call whose request bytes its deserializer cannot parse with INTERNAL
("Exception deserializing request!"), and that status is fixed inside grpc's server: the
servicer never sees the call. But the deserializer is the server's to choose, so this
interceptor, the innermost, swaps each handler's deserializer for one that never raises:
bytes that are not a valid message (a truncated field, a string that is not UTF-8, a wrong
wire type) become a `MalformedBody`, and the call ends with INVALID_ARGUMENT naming the
message type before the servicer runs (for a stream, at the item, which a stream of ingest
items ends like any other bad stream: the job is closed and can be resumed).

A body the client's own protobuf library refuses to build cannot be sent at all; what
reaches here is a hand-made or corrupted body.
"""
from __future__ import annotations

import dataclasses

import grpc

from delf_gateway.checks import RequestError


@dataclasses.dataclass(frozen=True)
class MalformedBody:
    """What a request's bytes were read as when they are not a valid message."""
    message: str


def safe_deserializer(deserializer):
    """`deserializer` that returns a MalformedBody instead of raising."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the expected message")

    def read(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and its kin: all mean "not this message"
            return MalformedBody(f"malformed request: {len(data)} bytes that are not a valid {type_name} "
                                 f"({type(exc).__name__}: {exc})")
    return read


def _refuse(request) -> None:
    if isinstance(request, MalformedBody):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _checked(requests, context, abort: bool = False):
    """The request stream, ending the call at the first malformed item."""
    for n, request in enumerate(requests):
        if isinstance(request, MalformedBody):
            message = f"item {n}: {request.message}"
            if abort:  # no ErrorInterceptor around stream-stream calls: end the call here
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)
        yield request


class MalformedBodyInterceptor(grpc.ServerInterceptor):
    """Innermost interceptor: every handler's deserializer made safe (module docstring);
    the RequestError it raises becomes the status in ErrorInterceptor."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        read = safe_deserializer(handler.request_deserializer)
        write = handler.response_serializer
        if handler.unary_unary:
            fn = handler.unary_unary

            def unary_unary(request, context):
                _refuse(request)
                return fn(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, read, write)
        if handler.unary_stream:
            fn_stream = handler.unary_stream

            def unary_stream(request, context):
                _refuse(request)
                yield from fn_stream(request, context)
            return grpc.unary_stream_rpc_method_handler(unary_stream, read, write)
        if handler.stream_unary:
            fn_in = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda requests, context: fn_in(_checked(requests, context), context), read, write)
        if handler.stream_stream:
            fn_both = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: fn_both(_checked(requests, context, abort=True), context), read, write)
        return handler
