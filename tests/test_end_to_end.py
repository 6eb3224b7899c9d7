"""The user's story, end to end, through the real gRPC gateway, Celery workers on
Redis and Milvus Lite: ingest real photos, search with altered copies of them."""
from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from delf_common.proto.delf.v1 import delf_pb2
from photos import SAMPLE_PHOTOS, jpeg, map_points, sample_photo, warped_query

pytestmark = pytest.mark.slow

CORNER_TOLERANCE_PX = 10.0


@pytest.fixture(scope="module")
def indexed(system, client):
    """The sample photos, ingested as one bulk job from a folder (as `delf ingest` does)."""
    folder = system.root / "photos" / "samples"
    folder.mkdir(parents=True)
    for name in SAMPLE_PHOTOS:
        (folder / f"{name}.jpg").write_bytes(jpeg(sample_photo(name)))
    job = client.ingest_folder(folder)
    job = client.wait_job(job.job_id)
    assert job.state == delf_pb2.JOB_STATE_COMPLETED, job
    assert (job.total, job.done, job.failed) == (len(SAMPLE_PHOTOS), len(SAMPLE_PHOTOS), 0), job.errors
    return folder


def corner_error(match, H_query_to_db, width, height) -> float:
    truth = map_points(H_query_to_db, [[0, 0], [width, 0], [width, height], [0, height]])
    found = np.array([[p.x, p.y] for p in match.corners])
    return float(np.abs(found - truth).max())


@pytest.mark.parametrize("name,seed", [("astronaut", 1), ("coffee", 2), ("motorcycle", 3)])
def test_warped_copy_finds_its_source_with_the_right_transform(indexed, client, name, seed):
    query, H = warped_query(sample_photo(name), seed=seed)
    response = client.search(jpeg(query), top_k=5)
    assert response.matches, "no matches"
    best = response.matches[0]
    assert best.image_id == name, [(m.image_id, m.inliers, m.votes) for m in response.matches]
    assert best.verified and best.inliers >= 20
    assert best.metadata["path"] == f"{name}.jpg"
    assert len(best.transform) == 9
    h, w = query.shape[:2]
    error = corner_error(best, H, w, h)
    assert error <= CORNER_TOLERANCE_PX, f"corners off by {error:.1f} px"
    # Ranked: verified matches first, by inliers.
    scores = [m.score for m in response.matches]
    assert scores == sorted(scores, reverse=True)


def test_query_box_searches_only_that_region(indexed, client):
    query, H = warped_query(sample_photo("rocket"), seed=4)
    h, w = query.shape[:2]
    box = (w * 0.15, h * 0.1, w * 0.75, h * 0.9)
    response = client.search(jpeg(query), top_k=3, box=box)
    full = client.search(jpeg(query), top_k=3)
    assert response.matches[0].image_id == "rocket"
    assert 0 < response.query_features < full.query_features
    x0, y0, x1, y1 = box
    truth = map_points(H, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    found = np.array([[p.x, p.y] for p in response.matches[0].corners])
    assert np.abs(found - truth).max() <= CORNER_TOLERANCE_PX


def test_search_by_indexed_id_leaves_the_photo_itself_out(indexed, client):
    response = client.search(image_id="chelsea", top_k=10)
    assert "chelsea" not in [m.image_id for m in response.matches]
    with pytest.raises(grpc.RpcError) as err:
        client.search(image_id="no-such-photo")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_add_again_replaces_and_delete_removes(indexed, client):
    photo = sample_photo("chelsea")
    before = client.stats()
    first = client.add_image("cat-copy", jpeg(photo), {"v": "1"})
    second = client.add_image("cat-copy", jpeg(photo[:, ::-1].copy()), {"v": "2"})
    after = client.stats()
    assert after.images == before.images + 1
    assert after.descriptors == before.descriptors + second.num_features
    info = client.get_image("cat-copy")
    assert info.metadata["v"] == "2" and info.num_features == second.num_features > 0
    assert first.width == info.width == photo.shape[1]
    deleted = client.delete_image("cat-copy")
    assert deleted.descriptors_removed == second.num_features
    assert client.stats().descriptors == before.descriptors
    with pytest.raises(grpc.RpcError) as err:
        client.get_image("cat-copy")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_job_with_locations_and_bad_items_reports_each_failure(system, indexed, client):
    good = system.root / "photos" / "loc" / "coffee2.jpg"
    good.parent.mkdir(parents=True, exist_ok=True)
    good.write_bytes(jpeg(sample_photo("coffee")[::2, ::2].copy()))
    items = [
        delf_pb2.IngestItem(image_id="loc-coffee", location=str(good)),
        delf_pb2.IngestItem(image_id="outside", location="/etc/passwd"),
        delf_pb2.IngestItem(image_id="dotdot", location=str(good.parent / ".." / ".." / ".." / "x.jpg")),
        delf_pb2.IngestItem(image_id="garbage", image=b"not a photo at all"),
        delf_pb2.IngestItem(image_id="truncated", image=jpeg(sample_photo("rocket"))[:5000]),
    ]
    job = client.wait_job(client.start_ingest_job(items).job_id)
    assert job.state == delf_pb2.JOB_STATE_COMPLETED
    assert (job.total, job.done, job.failed) == (5, 1, 4)
    reasons = {e.image_id: e.reason for e in job.errors}
    assert set(reasons) == {"outside", "dotdot", "garbage", "truncated"}
    assert all(reasons.values())
    assert client.get_image("loc-coffee").num_features > 0
    client.delete_image("loc-coffee")
    with pytest.raises(grpc.RpcError) as err:
        client.cancel_job(job.job_id)  # a completed job has nothing left to cancel
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cli_search_prints_a_ranked_table(system, indexed, tmp_path):
    query, _ = warped_query(sample_photo("astronaut"), seed=5)
    path = tmp_path / "query.jpg"
    path.write_bytes(jpeg(query))
    out = subprocess.run(
        [sys.executable, "-m", "delf_tools.cli", "--gateway", system.address, "search", str(path), "--top-k", "3"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    lines = out.splitlines()
    header = lines[1].split()
    assert header[:6] == ["rank", "image", "id", "score", "votes", "inliers"], out
    rows = [line.split() for line in lines[2:] if line.split() and line.split()[0].isdigit()]
    assert rows and rows[0][0] == "1" and rows[0][1] == "astronaut", out
    score, votes, inliers, verified = float(rows[0][2]), int(rows[0][3]), int(rows[0][4]), rows[0][5]
    assert score >= 0.9 and votes >= 20 and inliers >= 20 and verified == "yes", out
    assert [float(r[2]) for r in rows] == sorted((float(r[2]) for r in rows), reverse=True), out
    assert "verified from 0.90" in out, out  # the bar the server used


def test_cancelled_job_skips_what_is_left_and_keeps_what_is_indexed(system, indexed, client):
    photos = [sample_photo(n) for n in ("astronaut", "coffee", "rocket", "motorcycle")]
    items = [delf_pb2.IngestItem(image_id=f"cancel-{k}", image=jpeg(p[k % 3 * 20:, k % 4 * 20:].copy()))
             for k, p in enumerate(photos * 3)]
    job = client.start_ingest_job(items)
    cancelled = client.cancel_job(job.job_id)
    assert cancelled.state == delf_pb2.JOB_STATE_CANCELLED
    # Tasks already queued drain: each one is either indexed or skipped as cancelled.
    deadline = time.monotonic() + 120
    while (job := client.get_job(job.job_id)).done + job.failed < job.total:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job.state == delf_pb2.JOB_STATE_CANCELLED and job.total == len(items)
    assert job.failed > 0 and {e.reason for e in job.errors} == {"job cancelled"}
    indexed_ids = []
    for item in items:
        try:
            indexed_ids.append(client.get_image(item.image_id).image_id)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
    assert len(indexed_ids) == job.done
    for image_id in indexed_ids:
        client.delete_image(image_id)
    with pytest.raises(grpc.RpcError) as err:
        client.cancel_job("0123456789abcdef0123456789abcdef")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
