"""The internal contract (delf_common.contract, delf_common.messages): one rule per limit
for every service (issue 14 item 7), job ids checked before they reach Redis keys
(item 4), and typed messages whose wire is byte for byte what the services sent before
(a rolling upgrade mixes versions)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import msgpack
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from photos import jpeg, sample_photo  # noqa: E402

from delf_common.features import encode_array  # noqa: E402
from delf_common.proto.delf.v1 import delf_pb2  # noqa: E402

ID_512 = "界" * 170 + "ab"  # 510 + 2 = 512 bytes of UTF-8, 172 characters
ID_513 = "界" * 171         # 513 bytes of UTF-8, 171 characters (under the old 256-character rule)
UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"  # well formed, never created


def _small_photo() -> bytes:
    return jpeg(sample_photo("rocket")[::2, ::2].copy(), quality=85)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# --------------------------------------------------------------------------- item 7


@pytest.mark.slow
def test_item7_one_id_limit_for_every_service(client):
    """Issue 14 item 7: the id limit is 512 UTF-8 bytes (the images collection's VARCHAR
    counts bytes) at the gateway as in the indexer. A 171-character CJK id (513 bytes)
    passed the gateway's old 256-character rule and failed only after extraction."""
    assert len(ID_512.encode()) == 512 and len(ID_513.encode()) == 513
    photo = _small_photo()

    # AddImage: 512 bytes pass, 513 are refused before the photo is even looked at (a
    # photo that is not one would be refused for itself otherwise), and before extraction.
    info = client.add_image(ID_512, photo)
    try:
        assert info.image_id == ID_512 and info.num_features > 0
        assert client.get_image(ID_512).image_id == ID_512
    finally:
        client.delete_image(ID_512)
    for data in (photo, b"not a photo"):
        err = _refused(lambda: client.add_image(ID_513, data))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "image_id" in err.details() and "513 bytes" in err.details(), err.details()
        assert "512" in err.details() and "UTF-8" in err.details(), err.details()
    for call in (lambda: client.get_image(ID_513), lambda: client.delete_image(ID_513),
                 lambda: client.search(image_id=ID_513)):
        assert _refused(call).code() == grpc.StatusCode.INVALID_ARGUMENT

    # An ingest job: the same rule per item, at the gateway (the item never reaches a worker).
    job = client.start_ingest_job([delf_pb2.IngestItem(image_id=ID_512, image=photo),
                                   delf_pb2.IngestItem(image_id=ID_513, image=photo)])
    job = client.wait_job(job.job_id)
    try:
        assert (job.total, job.done, job.failed) == (2, 1, 1), job
        (failed_id, reason), = [(e.image_id, e.reason) for e in job.errors]
        assert failed_id.startswith("#1: ")
        assert "513 bytes" in reason and "512" in reason and "UTF-8" in reason, reason
    finally:
        client.delete_image(ID_512)

    # The indexer's own check is the same rule (one function).
    from delf_common import contract
    from delf_indexer import checks

    assert checks.check_image_id is contract.check_image_id
    assert contract.check_image_id(ID_512) == ID_512
    with pytest.raises(ValueError, match="513 bytes"):
        checks.check_image_id(ID_513)


def test_item7_limits_are_defined_once():
    """Every service reads the limits from the contract: same values, same functions."""
    from delf_common import contract
    from delf_gateway import checks as gateway_checks
    from delf_indexer import checks as indexer_checks
    from delf_indexer import schema  # noqa: F401 - the VARCHAR lengths come from the contract

    assert contract.MAX_ID_BYTES == 512
    assert indexer_checks.MAX_ID_LENGTH == gateway_checks.MAX_ID_LENGTH == contract.MAX_ID_BYTES
    assert indexer_checks.check_filter is contract.check_filter
    assert indexer_checks.check_image_id is contract.check_image_id
    for bad in ("", "tab\tid", ID_513, 7):
        with pytest.raises(ValueError):
            contract.check_image_id(bad)
    with pytest.raises(gateway_checks.RequestError) as err:
        gateway_checks.check_image_id(ID_513)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # Metadata: the gateway's 16 KiB of keys and values, and the indexer's stored JSON text.
    meta, text = contract.metadata_text({"k": "v" * 100})
    assert meta == {"k": "v" * 100} and json.loads(text) == meta
    with pytest.raises(ValueError, match="metadata"):
        contract.check_metadata({"k": "v" * (16 * 1024)})
    with pytest.raises(ValueError, match="JSON"):  # control characters grow sixfold as JSON
        contract.check_metadata({"k": "\x01" * 12000})
    with pytest.raises(gateway_checks.RequestError):
        gateway_checks.check_metadata({"k": "\x01" * 12000})
    # Filters: one function, the gateway's messages.
    assert contract.check_filter({"a": "b"}) == {"a": "b"}
    with pytest.raises(ValueError, match="1025 bytes"):
        contract.check_filter({"k": "v" * 1025})
    with pytest.raises(ValueError, match="17 pairs"):
        contract.check_filter({f"k{i}": "v" for i in range(17)})


# --------------------------------------------------------------------------- item 4


def _job_calls(client, job_id: str):
    return {
        "GetJob": lambda: client.get_job(job_id),
        "CancelJob": lambda: client.cancel_job(job_id),
        "ResumeJob": lambda: client.resume_job(job_id),
        "WatchJob": lambda: list(client.watch_job(job_id)),
        "StartIngestJob(resume)": lambda: client.start_ingest_job(
            iter([delf_pb2.IngestItem(image_id="item4-x")]), resume_job=job_id),
    }


@pytest.mark.slow
def test_item4_job_ids_are_checked(client):
    """Issue 14 item 4: `<job id>:items` answered INTERNAL ("KeyError: 'state'") and
    `<job id>:done` UNAVAILABLE (WRONGTYPE, read as an outage). A malformed job id is
    INVALID_ARGUMENT with a readable message; a well-formed unknown one NOT_FOUND."""
    # A real job whose side keys exist: one item refused at the gateway (no source).
    job = client.start_ingest_job(iter([delf_pb2.IngestItem(image_id="item4-a")]))
    job = client.wait_job(job.job_id)
    assert job.state == delf_pb2.JOB_STATE_COMPLETED and job.failed == 1
    for suffix in (":items", ":done", ":failed", ":sweep", "*", " ", "\n"):
        for name, call in _job_calls(client, job.job_id + suffix).items():
            err = _refused(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (suffix, name, err.code(), err.details())
            assert "job id" in err.details() and "32 hexadecimal digits" in err.details(), err.details()
    for bad in ("no-such-job", job.job_id.upper(), job.job_id[:-1]):
        assert _refused(lambda: client.get_job(bad)).code() == grpc.StatusCode.INVALID_ARGUMENT
    for name, call in _job_calls(client, UNKNOWN_JOB).items():
        err = _refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, (name, err.code(), err.details())
        assert UNKNOWN_JOB in err.details()
    assert client.get_job(job.job_id).job_id == job.job_id  # the real one still answers


def test_item4_job_store_checks_ids(monkeypatch):
    """The job store refuses malformed ids on its lookups, makes well-formed ones and lists
    only those."""
    import uuid

    import redis
    from conftest import redis_db_url

    from delf_common import contract
    from delf_common.jobs import JobStore

    monkeypatch.setenv("DELF_QUEUE_PREFIX", f"contracttest-{uuid.uuid4().hex[:6]}")
    jobs = JobStore(redis.Redis.from_url(redis_db_url()))
    job_id = jobs.create()
    assert contract.is_job_id(job_id)
    jobs.record_item(job_id, "a")
    jobs.mark_done(job_id, "a")
    for bad in (job_id + ":items", job_id + ":done", "", "x"):
        with pytest.raises(ValueError, match="32 hexadecimal digits"):
            jobs.get(bad)
    assert jobs.get(UNKNOWN_JOB) is None
    assert list(jobs.job_ids()) == [job_id]
