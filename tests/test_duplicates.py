"""Identical photos, on the real running system: a photo sent again under its own id is not
extracted again (an unchanged folder ingested again), and one sent under another id is
reported, then indexed (DELF_DUPLICATES=index, the default) or skipped (=skip). And
`delf duplicates`: near-identical photos (a resized copy) grouped, other viewpoints not."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TEST_REDIS_URL, RunningSystem, redis_available, system_env
from photos import jpeg, landmarks_dir, sample_photo

from delf_common.proto.delf.v1 import delf_pb2

pytestmark = pytest.mark.slow

NAMES = ("chelsea", "coffee", "rocket")
QUALITY = 87  # bytes no other test module sends to the shared system


def _photo(name: str, quality: int = QUALITY) -> bytes:
    return jpeg(sample_photo(name), quality=quality)


# Every id these tests add to the shared system: removed after each test, so that other
# modules' searches do not find these copies of their photos.
OUR_IDS = [f"dup-{n}" for n in NAMES] + ["dup-hubble", "dup-hubble-copy", "dup-hubble-third", "dup-astronaut",
                                         "dup-astronaut-2", "near-dom-01", "near-dom-01-small", "near-dom-02"]


@pytest.fixture(autouse=True)
def leaves_nothing_behind(request):
    yield
    if "client" not in request.fixturenames:
        return
    client = request.getfixturevalue("client")
    for image_id in OUR_IDS:
        try:
            client.delete_image(image_id)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc


def _folder(root: Path, name: str) -> Path:
    folder = root / "photos" / name
    folder.mkdir(parents=True)
    for photo in NAMES:
        (folder / f"dup-{photo}.jpg").write_bytes(_photo(photo))
    return folder


def _ingest(client, folder: Path) -> delf_pb2.Job:
    job = client.wait_job(client.ingest_folder(folder).job_id)
    assert job.state == delf_pb2.JOB_STATE_COMPLETED, job
    assert job.failed == 0, job.errors
    return job


def test_unchanged_folder_ingested_again_is_skipped_and_adds_no_rows(system, client):
    folder = _folder(system.root, "unchanged")
    first = _ingest(client, folder)
    assert (first.done, first.unchanged, first.duplicates) == (len(NAMES), 0, 0)
    before = client.stats()
    again = _ingest(client, folder)
    assert (again.total, again.done, again.unchanged) == (len(NAMES), len(NAMES), len(NAMES))
    after = client.stats()
    assert (after.images, after.descriptors) == (before.images, before.descriptors)
    info = client.get_image("dup-coffee")
    assert info.sha256 == hashlib.sha256((folder / "dup-coffee.jpg").read_bytes()).hexdigest()

    # A changed photo (other bytes) or changed metadata is indexed again; the rest is not.
    (folder / "dup-rocket.jpg").write_bytes(_photo("rocket", quality=80))
    third = client.wait_job(client.ingest_folder(folder, metadata={"album": "b"}).job_id)
    assert (third.done, third.unchanged) == (len(NAMES), 0)
    fourth = _ingest(client, folder)  # the metadata is back to the first one's: indexed again
    assert fourth.unchanged == 0


def test_identical_photo_under_another_id_is_reported_and_indexed(system, client):
    photo = _photo("hubble")
    first = client.add_image("dup-hubble", photo)
    assert (first.sha256, list(first.duplicate_of), first.skipped) == (
        hashlib.sha256(photo).hexdigest(), [], False)
    second = client.add_image("dup-hubble-copy", photo, {"note": "copy"})
    assert list(second.duplicate_of) == ["dup-hubble"] and not second.skipped
    assert client.get_image("dup-hubble-copy").num_features > 0  # DELF_DUPLICATES=index: indexed

    folder = system.root / "photos" / "copies"
    folder.mkdir(parents=True)
    (folder / "dup-hubble-third.jpg").write_bytes(photo)
    job = _ingest(client, folder)
    assert (job.done, job.duplicates, job.duplicates_skipped) == (1, 1, 0)
    assert job.duplicate_of["dup-hubble-third"] in ("dup-hubble", "dup-hubble-copy")
    assert client.get_image("dup-hubble-third").num_features > 0


def test_deleted_photo_leaves_no_hash_and_can_be_added_again(system, client):
    photo = _photo("astronaut")
    client.add_image("dup-astronaut", photo)
    client.delete_image("dup-astronaut")
    again = client.add_image("dup-astronaut-2", photo)
    assert list(again.duplicate_of) == []  # the deleted id holds nothing any more
    back = client.add_image("dup-astronaut", photo)
    assert list(back.duplicate_of) == ["dup-astronaut-2"] and not back.skipped
    assert client.get_image("dup-astronaut").sha256 == hashlib.sha256(photo).hexdigest()


# --------------------------------------------------------------------------- DELF_DUPLICATES=skip


@pytest.fixture(scope="module")
def skipping(tmp_path_factory):
    if not redis_available(TEST_REDIS_URL):
        pytest.fail(f"no Redis at {TEST_REDIS_URL}")
    root = tmp_path_factory.mktemp("skipping")
    (root / "photos").mkdir()
    running = RunningSystem(root, system_env(root, DELF_DUPLICATES="skip",
                                             DELF_MAX_IMAGE_BYTES=str(8 * 1024 * 1024)))
    running.start()
    client = running.client()
    yield running, client
    client.close()
    running.stop()


def test_with_skip_an_identical_photo_under_another_id_is_not_indexed(skipping):
    system, client = skipping
    photo = _photo("coffee")
    client.add_image("coffee", photo)
    copy = client.add_image("coffee-copy", photo)
    assert (list(copy.duplicate_of), copy.skipped) == (["coffee"], True)
    with pytest.raises(grpc.RpcError) as err:
        client.get_image("coffee-copy")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    folder = _folder(system.root, "skip")  # dup-coffee is coffee's bytes; the others are new
    job = _ingest(client, folder)
    assert (job.done, job.duplicates, job.duplicates_skipped) == (len(NAMES), 1, 1)
    assert dict(job.duplicate_of) == {"dup-coffee": "coffee"}
    assert client.stats().images == 1 + len(NAMES) - 1


# --------------------------------------------------------------------------- delf duplicates


def test_delf_duplicates_groups_a_resized_copy_with_its_original_not_another_viewpoint(system, client):
    landmarks = landmarks_dir()
    if landmarks is None:
        pytest.skip("landmarks-dev is not beside the checkout")
    import cv2

    folder = system.root / "photos" / "near"
    folder.mkdir(parents=True)
    original = (landmarks / "berlin_berliner_dom" / "01.jpg").read_bytes()
    other_view = (landmarks / "berlin_berliner_dom" / "02.jpg").read_bytes()
    rgb = cv2.imdecode(np.frombuffer(original, np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(rgb, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
    (folder / "near-dom-01.jpg").write_bytes(original)
    (folder / "near-dom-01-small.jpg").write_bytes(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])[1])
    (folder / "near-dom-02.jpg").write_bytes(other_view)
    _ingest(client, folder)
    # The other viewpoint is the same landmark, found and verified, yet not near-identical.
    assert "near-dom-01" in [m.image_id for m in client.search(image_id="near-dom-02").matches if m.verified]

    out = subprocess.run([sys.executable, "-m", "delf_tools.cli", "--gateway", system.address, "duplicates",
                          str(folder), "--json"], capture_output=True, text=True, timeout=600, check=True).stdout
    found = json.loads(out)
    assert found["searched"] == 3
    [group] = [g["ids"] for g in found["groups"] if "near-dom-01" in g["ids"]]
    assert "near-dom-01-small" in group and "near-dom-02" not in group, found


def test_delf_duplicates_without_a_path_lists_the_index_or_says_what_to_give(system):
    """Without PATH the command searches every indexed photo (ListImages); a gateway that
    cannot list them yet answers UNIMPLEMENTED, and the command says to give PATH."""
    run = subprocess.run([sys.executable, "-m", "delf_tools.cli", "--gateway", system.address, "duplicates",
                          "--json"], capture_output=True, text=True, timeout=1200)
    assert "Traceback" not in run.stderr
    if run.returncode == 2:
        assert "delf duplicates PATH" in run.stderr
    else:
        assert run.returncode == 0 and json.loads(run.stdout)["searched"] == client_images(system)


def client_images(system) -> int:
    with system.client() as c:
        return c.stats().images
