"""One traced system in one process, for tests/test_tracing.py: the gateway's gRPC server
and a real Celery worker (in a thread, consuming the extractor's, indexer's and verifier's
queues through Redis) with tracing on and the OpenTelemetry SDK's InMemorySpanExporter.
It ingests two photos as one job, searches with the first (`x-request-id` given), waits
until the workers' spans have ended and writes every finished span as JSON.

Its own process because a process has one global TracerProvider and the Celery
instrumentation hooks every Celery app in it.

Usage: python tests/tracing_probe.py OUT.json REQUEST_ID   (environment: DELF_REDIS_URL,
DELF_QUEUE_PREFIX, DELF_DATA_DIR, DELF_COLLECTION, DELF_DEVICE=cpu)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SETTLE_S = 30  # bound on waiting for the workers' spans to end after the answer came


def span_record(span) -> dict:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name, "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "start_ns": span.start_time, "end_ns": span.end_time,
        "attributes": {k: str(v) for k, v in (span.attributes or {}).items()},
        "links": [f"{link.context.span_id:016x}" for link in span.links],
    }


def wait_for_spans(exporter, names: set[str]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        finished = {s.name for s in exporter.get_finished_spans()}
        if names <= finished:
            return
        time.sleep(0.1)


def main(out: Path, request_id: str) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from delf_common import tracing

    exporter = InMemorySpanExporter()
    assert tracing.setup("probe", exporter=exporter)
    import delf_extractor.tasks  # noqa: F401 - register every service's tasks on the shared app
    import delf_indexer.tasks  # noqa: F401 - registers its tasks on the shared app
    import delf_verifier.tasks  # noqa: F401 - registers its tasks on the shared app
    from celery.contrib.testing.worker import start_worker

    from delf_common.celery_app import app
    from delf_common.client import DelfClient
    from delf_common.proto.delf.v1 import delf_pb2
    from delf_gateway.server import build_server
    from photos import jpeg, sample_photo

    server, port, stop, _watcher = build_server("127.0.0.1:0")
    server.start()
    photos = {name: jpeg(sample_photo(name)) for name in ("astronaut", "coffee")}
    try:
        with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=30), \
                DelfClient(f"127.0.0.1:{port}", timeout=300) as client:
            job = client.start_ingest_job(delf_pb2.IngestItem(image_id=name, image=data)
                                          for name, data in photos.items())
            done = client.wait_job(job.job_id)
            assert done.done == len(photos), f"ingest job: {done}"
            wait_for_spans(exporter, {"run/delf.ingest.index"})
            reply = client.stub.Search(delf_pb2.SearchRequest(image=photos["astronaut"], top_k=2),
                                       metadata=(("x-request-id", request_id),), timeout=300)
            assert reply.matches and reply.matches[0].image_id == "astronaut", reply
            wait_for_spans(exporter, {"run/delf.extract", "run/delf.index.search", "run/delf.verify"})
    finally:
        stop.set()
        server.stop(grace=1)
    spans = [span_record(s) for s in exporter.get_finished_spans()]
    out.write_text(json.dumps({"job_id": job.job_id, "spans": spans}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
