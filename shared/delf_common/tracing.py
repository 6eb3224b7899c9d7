"""OpenTelemetry traces across the gateway and the workers, off unless an exporter is configured.

One trace per search (its root: the gateway's gRPC server span; then a producer span per
task the gateway sends and the worker's span that runs it, in the extractor, indexer and
verifiers) and one per ingest item (its root: an ``ingest item`` span the gateway opens
when it sends the item's extract | index chain, linked to the StartIngestJob call's span).
The trace context rides in each Celery message's headers (opentelemetry-instrumentation-celery),
the gRPC side is opentelemetry-instrumentation-grpc's server interceptor. Every span of a
call carries its ids as attributes: ``delf.request_id`` and, when known, ``delf.job_id``
and ``delf.image_id``.

``DELF_TRACING`` (delf_common.config): ``auto`` exports OTLP when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set and is off otherwise;
``otlp``, ``console`` or ``off`` choose. The other standard variables apply
(``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the default, or ``grpc``;
``OTEL_SERVICE_NAME``, default ``delf-<service>``; ``OTEL_TRACES_SAMPLER``...). Off, nothing
of OpenTelemetry is imported and the hooks below return at once. The packages are the
optional ``tracing`` extra; without them a configured exporter is reported and ignored.
"""
from __future__ import annotations

import contextlib
import logging
import os

from delf_common import config, logs

log = logging.getLogger("delf.tracing")

ATTRIBUTE_PREFIX = "delf."
_TRACED_METHODS = "/delf.v1."  # health probes and reflection make no traces
_provider = None  # the TracerProvider while tracing is on in this process
_tracer = None
_otel = None  # opentelemetry's `trace` and `context` modules while on: (trace, context)


def mode() -> str:
    """off, otlp or console: DELF_TRACING with `auto` resolved."""
    chosen = config.get("DELF_TRACING")
    if chosen != "auto":
        return chosen
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return "off"


def enabled() -> bool:
    return _provider is not None


def setup(service: str, exporter=None) -> bool:
    """Turns tracing on in this process when DELF_TRACING asks for it, or with `exporter`
    (a SpanExporter, exported synchronously: tests give the SDK's InMemorySpanExporter).
    Instruments Celery (every app of the process). Idempotent; returns whether it is on."""
    global _provider, _tracer, _otel
    if _provider is not None:
        return True
    chosen = "given" if exporter is not None else mode()
    if chosen == "off":
        return False
    try:
        from opentelemetry import context, trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError as exc:
        log.warning("tracing not started (DELF_TRACING=%s): OpenTelemetry is not installed (%s); "
                    "pip install 'delf-search[tracing]'", chosen, exc)
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"delf-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif chosen == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        exporter = _otlp_exporter()
        if exporter is None:
            return False
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider, _tracer, _otel = provider, trace.get_tracer("delf", tracer_provider=provider), (trace, context)
    CeleryInstrumentor().instrument(tracer_provider=provider)
    from celery import signals

    # After the instrumentation's own task_prerun: the task's span is current here. The
    # task's ids are bound by delf_common.celery_app's receiver, which also annotates: one
    # of the two runs after both the span and the ids exist, whatever the import order.
    signals.task_prerun.connect(_annotate_task, weak=False)
    log.info("tracing on (%s) as %s", chosen, provider.resource.attributes.get("service.name"))
    return True


def _otlp_exporter():
    """The OTLP span exporter of OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, or None (logged) when
    its package is missing (the images carry the http/protobuf one)."""
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        log.warning("tracing not started: no OTLP exporter for protocol %s (%s); pip install "
                    "opentelemetry-exporter-otlp-proto-%s", protocol, exc, "grpc" if protocol == "grpc" else "http")
        return None
    return OTLPSpanExporter()


def shutdown() -> None:
    """Flushes and stops the exporter (a worker's warm shutdown, the gateway's exit)."""
    if _provider is not None:
        _provider.shutdown()


def server_interceptor():
    """The gRPC server interceptor that opens each delf.v1 call's span (the root of a
    search's trace), or None while tracing is off. Goes before (outside) the gateway's own."""
    if _provider is None:
        return None
    try:
        from opentelemetry.instrumentation.grpc import server_interceptor as otel_interceptor
    except ImportError as exc:
        log.warning("no gRPC server spans: opentelemetry-instrumentation-grpc is not installed (%s)", exc)
        return None
    return otel_interceptor(tracer_provider=_provider,
                            filter_=lambda details: (details.method or "").startswith(_TRACED_METHODS))


def annotate(**ids: object) -> None:
    """Sets the ids (request_id, job_id, image_id) on the current span as ``delf.<name>``."""
    if _otel is None:
        return
    span = _otel[0].get_current_span()
    if span.is_recording():
        for name, value in ids.items():
            if value:
                span.set_attribute(ATTRIBUTE_PREFIX + name, str(value))


def _annotate_task(**_kwargs) -> None:
    annotate(**{k: v for k, v in logs.current().items() if k != "task_id"})


_OFF = contextlib.nullcontext()


def new_trace(name: str, **ids: object):
    """A context manager: a new trace's root span `name` (e.g. one ingest item's), linked to
    the current span, carrying the bound ids and `ids`; what is sent inside it (Celery
    tasks) joins that trace. Does nothing while tracing is off."""
    if _provider is None:
        return _OFF
    return _root_span(name, ids)


@contextlib.contextmanager
def _root_span(name: str, ids: dict):
    trace, context = _otel
    current = trace.get_current_span().get_span_context()
    links = [trace.Link(current)] if current.is_valid else []
    with _tracer.start_as_current_span(name, context=context.Context(), links=links) as span:
        for key, value in {**logs.current(), **ids}.items():
            if value and key != "task_id":
                span.set_attribute(ATTRIBUTE_PREFIX + key, str(value))
        yield span
