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

from photos import jpeg, sample_photo

from delf_common.features import encode_array
from delf_common.proto.delf.v1 import delf_pb2

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
        err = _refused(lambda: client.add_image(ID_513, data))  # noqa: B023 - called at once, inside the loop
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

    # The indexer's own checks are the same rule (the same functions).
    from delf_common import contract
    from delf_indexer import rows, tasks

    assert contract.check_image_id(ID_512) == ID_512 and rows.check_id_fits(ID_512) == ID_512
    assert tasks._bad_id(ID_512) is None
    with pytest.raises(ValueError, match="513 bytes"):
        rows.check_id_fits(ID_513)
    refused = tasks._bad_id(ID_513)["error"]
    assert refused["code"] == "INVALID_ARGUMENT" and refused["message"] == reason


def test_item7_limits_are_defined_once():
    """Every service reads the limits from the contract: same values, same functions."""
    from delf_common import contract
    from delf_gateway import checks as gateway_checks
    from delf_indexer import listing, rows, schema, store, tasks

    assert contract.MAX_ID_BYTES == 512
    assert schema.MAX_ID_BYTES == gateway_checks.MAX_ID_LENGTH == contract.MAX_ID_BYTES  # the VARCHAR length
    assert tasks.check_filter is listing.check_filter is store.check_filter is contract.check_filter
    assert rows.check_id_fits is store.check_id_fits is contract.check_id_fits  # the store's part of the rule
    assert rows.metadata_text is contract.metadata_text
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
            if suffix == "\n" and name == "StartIngestJob(resume)":
                continue  # gRPC itself refuses a line break in call metadata, client side
            err = _refused(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (suffix, name, err.code(), err.details())
            assert "job id" in err.details() and "32 hexadecimal digits" in err.details(), err.details()
    for bad in ("no-such-job", job.job_id.upper(), job.job_id[:-1]):
        assert _refused(lambda: client.get_job(bad)).code() == grpc.StatusCode.INVALID_ARGUMENT  # noqa: B023 - called at once, inside the loop
    for name, call in _job_calls(client, UNKNOWN_JOB).items():
        err = _refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, (name, err.code(), err.details())
        assert UNKNOWN_JOB in err.details()
    assert client.get_job(job.job_id).job_id == job.job_id  # the real one still answers


def test_item4_job_store_checks_ids(monkeypatch):
    """The job store makes well-formed ids, lists only those, and finds no job for a
    malformed id (whose keys, `<id>:items` or `<id>:done`, are not a job's)."""
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
    for bad in (job_id + ":items", job_id + ":done", job_id + ":failed", "", "x", None):
        assert jobs.get(bad) is None and not jobs.exists(bad)
    assert jobs.get(job_id).done == 1 and jobs.exists(job_id)
    assert jobs.get(UNKNOWN_JOB) is None
    with pytest.raises(ValueError, match="32 hexadecimal digits"):
        contract.check_job_id(job_id + ":items")
    assert list(jobs.job_ids()) == [job_id]


# --------------------------------------------------------------------------- the envelope


def test_envelope_is_one_pair_and_a_reader():
    from delf_common import contract

    assert contract.ok(image_id="a", features={}) == {"ok": True, "image_id": "a", "features": {}}
    assert list(contract.error("NOT_FOUND", "gone", image_id="a")) == ["ok", "image_id", "error"]
    assert contract.error("NOT_FOUND", "gone") == {"ok": False, "error": {"code": "NOT_FOUND", "message": "gone"}}
    assert contract.failure(contract.ok(x=1)) is None
    assert contract.failure(contract.error("NOT_FOUND", "gone")) == contract.Failure("NOT_FOUND", "gone")
    assert contract.failure({"ok": False}, default_message="indexer failed") == \
        contract.Failure("INTERNAL", "indexer failed")
    assert contract.failure(None).code == "INTERNAL"


def test_task_names_and_routes_live_in_the_contract():
    from delf_common import celery_app, config, contract

    for name in ("EXTRACT", "INGEST_EXTRACT", "INDEX_ADD", "INGEST_INDEX", "INDEX_SEARCH", "INDEX_GET",
                 "INDEX_FEATURES", "INDEX_DELETE", "INDEX_STATS", "VERIFY"):
        assert getattr(contract, name) in contract.ROUTES
    assert set(contract.ROUTES.values()) == set(contract.SERVICES)
    # the Celery app routes every task of the contract to the contract's queue
    app = celery_app.make_app("contract-test")
    conf, prefix = app.conf, celery_app.queue_prefix(app)
    assert prefix == config.get("DELF_QUEUE_PREFIX")  # read when the app was built
    assert conf.task_routes == {task: {"queue": contract.queue_for_task(task, prefix)} for task in contract.ROUTES}
    assert {q.name for q in conf.task_queues} == {contract.queue_name(s, prefix) for s in contract.SERVICES}


# --------------------------------------------------------------------------- messages: the wire


def _old_candidate_dicts(candidates, hits, info, chosen) -> list[dict]:
    """services/indexer/delf_indexer/candidates.py before the messages (verbatim)."""
    out = []
    for c in candidates:
        row = info.get(c.image_id)
        if row is None:
            continue
        pairs = list(zip(c.query_idx.tolist(), c.neighbour.tolist()))
        xy = np.array([(hits[qi][2][j], hits[qi][3][j]) for qi, j in pairs], np.float32).reshape(len(pairs), 2)
        db_scale = np.array([hits[qi][4][j] for qi, j in pairs], np.float32)
        rows = c.query_idx.tolist()
        qidx = np.array(rows if chosen is None else chosen[rows], np.int32)
        out.append({
            "image_id": c.image_id,
            "votes": c.votes,
            "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
            "width": int(row["width"]),
            "height": int(row["height"]),
            "query_idx": encode_array(qidx),
            "db_xy": encode_array(xy),
            "db_scale": encode_array(db_scale),
        })
    return out


def _voted(seed: int = 0):
    """Voted candidates, kNN hits and images rows as DescriptorStore.search has them."""
    from delf_indexer.voting import Candidate

    rng = np.random.default_rng(seed)
    k, rows = 4, 12
    hits = [(rng.random(k).tolist(), [f"img{j % 3}" for j in range(k)], rng.random(k).tolist(),
             rng.random(k).tolist(), rng.random(k).tolist()) for _ in range(rows)]
    candidates = [Candidate(f"img{i}", 7 - i, 0.5, np.array([1, 4, 9][: 3 - i], np.int64),
                            np.array([i, i, i][: 3 - i], np.int64)) for i in range(3)]
    info = {"img0": {"metadata": json.dumps({"city": "京都", "b": "x"}), "width": 640, "height": 480},
            "img1": {"metadata": "", "width": 33, "height": 1000}}  # img2: deleted meanwhile
    chosen = np.sort(rng.permutation(40)[:rows])
    return candidates, hits, info, chosen


@pytest.mark.parametrize("with_chosen", [True, False])
def test_candidates_wire_is_byte_for_byte_the_old_one(with_chosen):
    from delf_common.messages import SearchCandidate
    from delf_indexer.candidates import candidate_dicts, search_candidates

    candidates, hits, info, chosen = _voted()
    chosen = chosen if with_chosen else None
    new = candidate_dicts(candidates, hits, info, chosen)
    old = _old_candidate_dicts(candidates, hits, info, chosen)
    assert len(new) == 2 and msgpack.packb(new) == msgpack.packb(old)
    typed = search_candidates(candidates, hits, info, chosen)
    assert [SearchCandidate.from_wire(w).to_wire() for w in old] == [c.to_wire() for c in typed]
    assert msgpack.packb([SearchCandidate.from_wire(msgpack.unpackb(msgpack.packb(w))).to_wire() for w in old]) \
        == msgpack.packb(old)
    back = SearchCandidate.from_wire(old[0])
    assert back.metadata == {"city": "京都", "b": "x"} and (back.width, back.height) == (640, 480)
    assert back.query_idx.dtype == np.int64 and back.db_xy.shape == (3, 2) and back.db_scale.shape == (3,)


def test_candidates_from_older_senders():
    """Candidates without db_scale, metadata or size (older indexers, hand-made tests)."""
    from delf_common.messages import SearchCandidate

    wire = {"image_id": "m", "votes": 9, "query_idx": encode_array(np.arange(5)),
            "db_xy": encode_array(np.zeros((5, 2), np.float32))}
    c = SearchCandidate.from_wire(wire)
    assert c.db_scale is None and c.metadata == {} and (c.width, c.height) == (0, 0)
    assert "db_scale" not in c.to_wire() and c.to_wire()["query_idx"]["dtype"] == "<i4"
    with pytest.raises(KeyError):
        SearchCandidate.from_wire({"image_id": "m"})


def test_verify_query_wire_is_byte_for_byte_the_old_one():
    from delf_common.features import DelfFeatures
    from delf_common.messages import VerifyQuery

    rng = np.random.default_rng(3)
    n = 50
    features = DelfFeatures(rng.random((n, 2)) * 600, rng.random(n) * 4, rng.random(n), rng.random((n, 40)),
                            (640, 480))
    for size, box in (((640, 480), None), ((640, 480), (10.5, 0.0, 320.0, 479.25))):
        old = {  # services/gateway/delf_gateway/search.py before the messages
            "locations": encode_array(features.locations),
            "scales": encode_array(np.asarray(features.scales, np.float32)),
            "image_size": list(size),
            "box": list(box) if box else None,
        }
        new = VerifyQuery(features.locations, size, scales=features.scales, box=box).to_wire()
        assert msgpack.packb(new) == msgpack.packb(old)
        back = VerifyQuery.from_wire(msgpack.unpackb(msgpack.packb(old)))
        assert msgpack.packb(back.to_wire()) == msgpack.packb(old)
        assert back.image_size == size and back.box == box
    older = VerifyQuery.from_wire({"locations": encode_array(features.locations), "image_size": [640, 480],
                                   "box": None})
    assert older.scales is None and "scales" not in older.to_wire()
    for bad in ({"scales": encode_array(features.scales[:-1])}, {"box": [5, 5, 5, 9]}, {"image_size": [1]}):
        with pytest.raises(ValueError):
            VerifyQuery.from_wire({**old, **bad})


def test_verified_matches_wire_is_byte_for_byte_the_old_one():
    from delf_common.messages import VerifiedMatch
    from delf_verifier.ransac import verify

    rng = np.random.default_rng(5)
    q = rng.uniform(0, 600, (60, 2)).astype(np.float32)
    for db, votes in ((q * 1.1 + 7, 40), (rng.uniform(0, 600, (60, 2)).astype(np.float32), 3)):
        v = verify(q, db, (600, 600), None, min_inliers=12, ransac_px=8.0)
        old = {  # services/verifier/delf_verifier/tasks.py before the messages
            "image_id": "m", "votes": int(votes), "inliers": v.inliers, "verified": v.verified,
            "transform": v.transform, "corners": v.corners,
        }
        new = VerifiedMatch("m", votes, v.inliers, v.verified, v.transform, v.corners).to_wire()
        assert msgpack.packb(new) == msgpack.packb(old)
        assert msgpack.packb(VerifiedMatch.from_wire(msgpack.unpackb(msgpack.packb(old))).to_wire()) == \
            msgpack.packb(old)
    assert VerifiedMatch.from_wire({"image_id": "x", "votes": 2, "inliers": 0, "verified": False}) == \
        VerifiedMatch("x", 2, 0, False, [], [])


def test_verify_task_answers_typed_matches():
    """delf.verify takes the candidates the indexer sends and answers VerifiedMatch wires."""
    from delf_common.messages import SearchCandidate, VerifiedMatch, VerifyQuery
    from delf_verifier.tasks import verify_candidates

    rng = np.random.default_rng(9)
    q = rng.uniform(0, 600, (80, 2)).astype(np.float32)
    idx = np.arange(80)
    query = VerifyQuery(q, (600, 600), scales=np.ones(80, np.float32)).to_wire()
    cands = [SearchCandidate("good", 50, idx, q * 0.9 + 5, np.ones(80, np.float32)).to_wire(),
             SearchCandidate("noise", 60, idx, rng.uniform(0, 600, (80, 2))).to_wire()]
    reply = verify_candidates(query, cands, {"verified_score": 0.9, "ransac_px": 8.0})
    matches = [VerifiedMatch.from_wire(m) for m in reply["ok"] and reply["matches"]]
    assert [m.image_id for m in matches] == ["good", "noise"]
    assert matches[0].verified and len(matches[0].transform) == 9 and len(matches[0].corners) == 4
    bad = SearchCandidate("bad", 1, idx + 5, q).to_wire()
    assert verify_candidates(query, [bad], {})["error"]["code"] == "INVALID_ARGUMENT"
    assert "malformed query" in verify_candidates({"image_size": [1, 1]}, cands, {})["error"]["message"]
