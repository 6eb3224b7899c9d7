"""OpenTelemetry traces (delf_common.tracing): one trace per search and per ingest item,
across the gateway and the extractor, indexer and verifier, the request id on its spans;
and no tracer, instrumentation or exporter while none is configured.

The traced system (tests/tracing_probe.py) runs in a process of its own: the gateway's
gRPC server and a real Celery worker consuming the three services' queues through Redis,
with the SDK's InMemorySpanExporter; it writes the finished spans as JSON, checked here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import redis_available, redis_db_url

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.celery")
pytest.importorskip("opentelemetry.instrumentation.grpc")

PROBE = Path(__file__).parent / "tracing_probe.py"
WORKER_TASKS = {"extractor": "delf.extract", "indexer": "delf.index.search", "verifier": "delf.verify"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELF_", "OTEL_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_without_an_exporter_no_tracing_is_set_up():
    code = (
        "import sys\n"
        "from delf_gateway.server import build_server\n"
        "import delf_verifier.tasks\n"
        "from delf_common import tracing\n"
        "server, port, stop, watcher = build_server('127.0.0.1:0')\n"
        "assert not tracing.setup('verifier') and not tracing.enabled()\n"
        "assert tracing.server_interceptor() is None\n"
        "tracing.annotate(request_id='r')\n"
        "with tracing.new_trace('ingest item', image_id='x') as span: assert span is None\n"
        # (redis 8 imports opentelemetry's API and metrics SDK itself when installed)
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.instrumentation', 'opentelemetry.exporter')))\n"
        "assert not loaded, loaded\n"
        "from opentelemetry import trace\n"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_auto_exports_only_when_an_otlp_endpoint_is_set(monkeypatch):
    from delf_common import config, tracing

    for name in ("DELF_TRACING", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.mode() == "off"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert tracing.mode() == "otlp"
    monkeypatch.setenv("DELF_TRACING", "off")
    assert tracing.mode() == "off"
    monkeypatch.setenv("DELF_TRACING", "jaeger")
    with pytest.raises(config.ConfigError):
        tracing.mode()


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    url = redis_db_url()
    if not redis_available(url):
        pytest.fail(f"no Redis at {url}")
    root = tmp_path_factory.mktemp("tracing")
    out, request_id = root / "spans.json", f"trace-test-{uuid.uuid4().hex[:8]}"
    env = clean_env(DELF_REDIS_URL=url, DELF_QUEUE_PREFIX=f"delftrace-{uuid.uuid4().hex[:8]}",
                    DELF_DATA_DIR=str(root / "data"), DELF_COLLECTION="traced", DELF_DEVICE="cpu")
    done = subprocess.run([sys.executable, str(PROBE), str(out), request_id], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    data = json.loads(out.read_text())
    return data["spans"], data["job_id"], request_id


def chain_to_root(span: dict, by_id: dict[str, dict]) -> list[str]:
    """The names from `span` up to its trace's root, following parent ids."""
    names = [span["name"]]
    while span["parent_id"] is not None:
        assert span["parent_id"] in by_id, f"{span['name']}: its parent is not in the trace"
        span = by_id[span["parent_id"]]
        names.append(span["name"])
    return names


@pytest.mark.slow
def test_a_search_is_one_trace_through_the_gateway_and_the_three_workers(traced):
    spans, _job_id, request_id = traced
    roots = [s for s in spans if s["kind"] == "SERVER" and s["name"].endswith("/Search")]
    assert len(roots) == 1, [s["name"] for s in spans]
    root = roots[0]
    assert root["parent_id"] is None
    assert root["attributes"].get("delf.request_id") == request_id
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    by_id = {s["span_id"]: s for s in trace}
    for service, task in WORKER_TASKS.items():
        runs = [s for s in trace if s["name"] == f"run/{task}"]
        assert runs, f"no {service} span ({task}) in the search's trace: {sorted(by_id[i]['name'] for i in by_id)}"
        for run in runs:
            assert run["kind"] == "CONSUMER"
            # worker span <- the gateway's producer span <- the gRPC server span
            assert chain_to_root(run, by_id) == [f"run/{task}", f"apply_async/{task}", root["name"]]
            assert run["attributes"].get("delf.request_id") == request_id
            assert 0 < run["end_ns"] - run["start_ns"] <= root["end_ns"] - root["start_ns"]
            assert root["start_ns"] <= run["start_ns"] and run["end_ns"] > run["start_ns"]
    assert root["end_ns"] > root["start_ns"]


@pytest.mark.slow
def test_each_ingest_item_is_a_trace_of_its_own(traced):
    spans, job_id, _request_id = traced
    items = [s for s in spans if s["name"] == "ingest item"]
    assert sorted(s["attributes"].get("delf.image_id") for s in items) == ["astronaut", "coffee"]
    assert len({s["trace_id"] for s in items}) == 2
    (job_call,) = [s for s in spans if s["kind"] == "SERVER" and s["name"].endswith("/StartIngestJob")]
    for item in items:
        assert item["parent_id"] is None and item["trace_id"] != job_call["trace_id"]
        assert item["links"] == [job_call["span_id"]]  # the call that brought it
        assert item["attributes"].get("delf.job_id") == job_id
        trace = [s for s in spans if s["trace_id"] == item["trace_id"]]
        by_id = {s["span_id"]: s for s in trace}
        names = {s["name"] for s in trace}
        assert {"run/delf.ingest.extract", "run/delf.ingest.index"} <= names, names
        (index_run,) = [s for s in trace if s["name"] == "run/delf.ingest.index"]
        # published by the extractor when its step finished (the chain's next link)
        assert chain_to_root(index_run, by_id)[:3] == ["run/delf.ingest.index", "apply_async/delf.ingest.index",
                                                       "run/delf.ingest.extract"]
        assert chain_to_root(index_run, by_id)[-1] == "ingest item"
        assert index_run["attributes"].get("delf.image_id") == item["attributes"]["delf.image_id"]
