"""Issue 22, item 8: a request body that is not a valid protobuf message answers
INVALID_ARGUMENT (gRPC's own answer is INTERNAL, "Exception deserializing request!"), in
every kind of call: unary, server stream, client stream (an ingest job), and the
reflection service's bidirectional stream. A gateway with no workers: the bodies are
refused before any work."""
from __future__ import annotations

import uuid

import grpc
import pytest

from conftest import free_port, redis_db_url
from delf_common import config
from delf_common.proto.delf.v1 import delf_pb2

TRUNCATED = b"\x0a\x05ab"               # field 1 (a string) says 5 bytes, 2 follow
NOT_UTF8 = b"\x0a\x02\xff\xfe"          # field 1 (a string) is not UTF-8
BAD_WIRE_TYPE = b"\x0f\x01"             # field 1 with wire type 7, which does not exist
NO_SUCH_JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def gateway():
    from delf_gateway.server import build_server

    with pytest.MonkeyPatch.context() as mp:
        for name in config.SETTINGS:
            mp.delenv(name, raising=False)
        mp.setenv("DELF_REDIS_URL", redis_db_url())
        mp.setenv("DELF_QUEUE_PREFIX", f"delftest-body-{uuid.uuid4().hex[:8]}")
        mp.setenv("DELF_HEALTH_REQUIRE", "redis")
        address = f"127.0.0.1:{free_port()}"
        server, _, stop, watcher = build_server(address, max_workers=4)
    server.start()
    watcher.start()
    with grpc.insecure_channel(address) as channel:
        yield channel
    stop.set()
    server.stop(grace=None).wait(5)
    watcher.join(5)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code(), failed.value.details()


@pytest.mark.parametrize("body", [TRUNCATED, NOT_UTF8, BAD_WIRE_TYPE], ids=["truncated", "not-utf8", "wire-type"])
def test_a_malformed_unary_body_is_invalid_argument_naming_the_message(gateway, body):
    get_job = gateway.unary_unary("/delf.v1.ImageSearch/GetJob")  # raw bytes in, raw bytes out
    code, details = _status(lambda: get_job(body, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "malformed request" in details and "delf.v1.GetJobRequest" in details, details


def test_a_malformed_body_of_a_server_stream_is_invalid_argument(gateway):
    watch = gateway.unary_stream("/delf.v1.ImageSearch/WatchJob")
    code, details = _status(lambda: list(watch(TRUNCATED, timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in details, (code, details)


def test_a_malformed_item_of_an_ingest_stream_is_invalid_argument(gateway):
    start = gateway.stream_unary("/delf.v1.ImageSearch/StartIngestJob")
    code, details = _status(lambda: start(iter([NOT_UTF8]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "item 0" in details and "delf.v1.IngestItem" in details, details


def test_a_malformed_reflection_request_is_invalid_argument(gateway):
    reflect = gateway.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    code, details = _status(lambda: list(reflect(iter([TRUNCATED]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in details, (code, details)


def test_well_formed_bodies_are_answered_as_before(gateway):
    get_job = gateway.unary_unary("/delf.v1.ImageSearch/GetJob",
                                  request_serializer=delf_pb2.GetJobRequest.SerializeToString,
                                  response_deserializer=delf_pb2.Job.FromString)
    code, _ = _status(lambda: get_job(delf_pb2.GetJobRequest(job_id=NO_SUCH_JOB), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _status(lambda: get_job(delf_pb2.GetJobRequest(job_id="not a job id"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_malformed_listing_body_is_invalid_argument(gateway):
    """ListImages and ListJobs (issue 22 item 3): a page_token that is not UTF-8."""
    for method, message in (("ListImages", "delf.v1.ListImagesRequest"), ("ListJobs", "delf.v1.ListJobsRequest")):
        call = gateway.unary_unary(f"/delf.v1.ImageSearch/{method}")
        code, details = _status(lambda: call(b"\x12\x02\xff\xfe", timeout=10))  # noqa: B023 - called at once; field 2, not UTF-8
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, (code, details)
