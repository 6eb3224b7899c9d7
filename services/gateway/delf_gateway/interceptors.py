"""The gateway's gRPC server interceptors, outermost first.

ObserveInterceptor gives every call a request id, logs one line per call and counts and
times it; AuthInterceptor (when DELF_AUTH_TOKENS is set) refuses delf.v1 calls without an
accepted bearer token; ErrorInterceptor turns RequestError (delf_gateway.checks) and
unexpected exceptions into a gRPC status; innermost, MalformedBodyInterceptor
(delf_gateway.malformed) answers a request body that is not a valid message with
INVALID_ARGUMENT.
"""
from __future__ import annotations

import hmac
import logging
import time

import grpc
import redis

from delf_common import logs
from delf_common import metrics
from delf_common import tracing
from delf_gateway.checks import RequestError

log = logging.getLogger("delf.gateway")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns RequestError (and unexpected exceptions) into a gRPC status."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(fn):
            def call(request_or_iterator, context):
                try:
                    return fn(request_or_iterator, context)
                except RequestError as exc:
                    context.abort(exc.code, exc.message)
                except grpc.RpcError:
                    raise
                except redis.RedisError as exc:
                    log.exception("%s: Redis unavailable", method)
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"the broker is unavailable: {exc}")
                except Exception as exc:  # the server must keep serving
                    if context.code() is not None:  # already aborted
                        raise
                    log.exception("%s failed", method)
                    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return call

        def wrap_stream(fn):
            def call(request, context):
                try:
                    yield from fn(request, context)
                except RequestError as exc:
                    context.abort(exc.code, exc.message)
                except grpc.RpcError:
                    raise
                except Exception as exc:
                    log.exception("%s failed", method)
                    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        return handler


_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")  # probes: their log lines at DEBUG
_ERROR_CODES = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
_WARNING_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def _request_id(metadata) -> str:
    """The caller's `x-request-id` when it is a sensible id, else a new one."""
    for key, value in metadata or ():
        if key == logs.REQUEST_ID_HEADER:
            return logs.clean_request_id(value) or logs.new_request_id()
    return logs.new_request_id()


def _job_id_of(message) -> str | None:
    value = getattr(message, "job_id", None)
    return value if isinstance(value, str) and value else None


class _RequestIdContext:
    """The servicer context a handler sees: `x-request-id` rides along with any initial or
    trailing metadata the handler sends; everything else goes to the real context."""

    def __init__(self, context, request_id: str):
        self._context = context
        self._pair = (logs.REQUEST_ID_HEADER, request_id)

    def send_initial_metadata(self, metadata):
        return self._context.send_initial_metadata(tuple(metadata or ()) + (self._pair,))

    def set_trailing_metadata(self, metadata):
        return self._context.set_trailing_metadata(tuple(metadata or ()) + (self._pair,))

    def __getattr__(self, name):
        return getattr(self._context, name)


class _CallObserver:
    """What ObserveInterceptor does around each call of one method: binds the request id
    for the logs and sends it back, then logs, counts and times the call."""

    def __init__(self, full_method: str, request_id: str):
        self.method = full_method.rsplit("/", 1)[-1] or "unknown"
        self.quiet = full_method.startswith(_QUIET_PREFIXES)
        self.request_id = request_id

    def begin(self, context, request) -> list:
        tokens = logs.bind(request_id=self.request_id, job_id=_job_id_of(request))
        tracing.annotate(request_id=self.request_id, job_id=_job_id_of(request))
        try:
            context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, self.request_id),))
        except Exception:  # noqa: BLE001 - e.g. the call is already over
            pass
        return tokens

    def finish(self, context, started: float, failed: bool, tokens: list, reply=None) -> None:
        method = self.method
        try:
            elapsed = time.monotonic() - started
            name = _code_name(context, failed)
            metrics.GATEWAY_REQUESTS.labels(method, name).inc()
            metrics.GATEWAY_LATENCY.labels(method).observe(elapsed)
            level = _log_level(name, self.quiet)
            if not log.isEnabledFor(level):
                return
            extra = {"method": method, "code": name, "duration_s": round(elapsed, 4)}
            job_id = _job_id_of(reply)
            if job_id:
                extra["job_id"] = job_id
            details = _error_details(context) if name != "OK" else None
            if details:
                extra["error"] = str(details)[:500]
            log.log(level, "%s %s in %.3f s%s", method, name, elapsed,
                    f": {str(details)[:500]}" if details else "", extra=extra)
        finally:
            logs.unbind(tokens)

    def unary(self, fn):
        def call(request_or_iterator, context):
            started, failed, reply = time.monotonic(), True, None
            tokens = self.begin(context, request_or_iterator)
            try:
                reply = fn(request_or_iterator, _RequestIdContext(context, self.request_id))
                failed = False
                return reply
            finally:
                self.finish(context, started, failed, tokens, reply)
        return call

    def stream(self, fn):
        def call(request_or_iterator, context):
            started, failed = time.monotonic(), True
            tokens = self.begin(context, request_or_iterator)
            try:
                yield from fn(request_or_iterator, _RequestIdContext(context, self.request_id))
                failed = False
            finally:
                self.finish(context, started, failed, tokens)
        return call


def _code_name(context, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return getattr(code, "name", str(code))


def _log_level(name: str, quiet: bool) -> int:
    return (logging.DEBUG if quiet and name == "OK" else logging.ERROR if name in _ERROR_CODES
            else logging.WARNING if name in _WARNING_CODES else logging.INFO)


def _error_details(context):
    with_details = getattr(context, "details", None)
    details = with_details() if callable(with_details) else None
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    return details


class ObserveInterceptor(grpc.ServerInterceptor):
    """Outermost: gives every call a request id (the caller's `x-request-id` or a new one),
    sends it back in the trailing metadata (and in the initial metadata when the handler
    sends some), binds it for the logs and the Celery tasks the call sends, then logs one
    line per call (method, status code, duration, ids) and counts and times it
    (delf_common.metrics)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        observer = _CallObserver(handler_call_details.method or "",
                                 _request_id(handler_call_details.invocation_metadata))
        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(observer.unary(handler.unary_unary), *args)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(observer.unary(handler.stream_unary), *args)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(observer.stream(handler.unary_stream), *args)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(observer.stream(handler.stream_stream), *args)
        return handler


AUTH_PREFIX = "/delf.v1."  # methods that need a token; health and reflection stay open
_AUTH_HELP = "send the metadata `authorization: Bearer <token>` (delf CLI: --token or DELF_TOKEN)"


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` with one of `tokens` on every delf.v1 method."""

    def __init__(self, tokens):
        self.tokens = [t.encode() for t in tokens if t]

    def _refusal(self, metadata) -> str | None:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return f"missing credentials: {_AUTH_HELP}"
        if len(values) > 1:
            return "malformed credentials: more than one authorization header"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "malformed credentials: the authorization header must be `Bearer <token>`"
        given = token.encode()
        ok = False
        for accepted in self.tokens:  # no early exit: constant time over the list
            ok |= hmac.compare_digest(given, accepted)
        return None if ok else "invalid credentials: the bearer token is not accepted"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not method.startswith(AUTH_PREFIX):
            return continuation(handler_call_details)
        refusal = self._refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, as without auth
        log.warning("%s: UNAUTHENTICATED (%s)", method, refusal.split(":")[0])

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

        def deny_stream(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
            yield  # pragma: no cover - makes this a generator

        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, *args)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, *args)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, *args)
        return grpc.stream_stream_rpc_method_handler(deny_stream, *args)
