"""Extractor service: the Celery tasks. They are registered under the contract's names
and answer the contract's dicts; ingest items are read from bytes or a location, and a
location is confined to DELF_INGEST_ROOTS (no '..', no symlink escapes, a byte limit).
"""
from __future__ import annotations

from extractor_fixtures import png_bytes  # first: sets the test Redis

import pytest
from skimage import data

from delf_common.features import DelfFeatures
from delf_common.images import ImageRejected
from delf_extractor import sources, tasks
from delf_extractor.extract import DelfExtractor
from delf_extractor.settings import ExtractorSettings


@pytest.fixture(scope="module")
def extractor() -> DelfExtractor:
    return DelfExtractor("effnet-lite0", device="cpu")


# --------------------------------------------------------------------------- tasks


@pytest.fixture
def worker(extractor, monkeypatch):
    """The task module with the test's extractor as its per-process model, and its settings
    read again at first use (after the test has set its environment)."""
    monkeypatch.setattr(tasks, "_extractor", extractor)
    monkeypatch.setattr(tasks, "_settings", None)
    return tasks


def read_location(location: str) -> bytes:
    """An ingest location read under the environment's settings, as a worker reads it."""
    settings = ExtractorSettings.from_env()
    return sources.read_location(location, settings.ingest_roots, settings.image_limits.max_bytes)


def test_tasks_are_registered_under_contract_names():
    from delf_common.celery_app import app
    from delf_common.contract import EXTRACT, INGEST_EXTRACT

    assert app.tasks[EXTRACT].run is tasks.extract.run
    assert app.tasks[INGEST_EXTRACT].run is tasks.ingest_extract.run


def test_extract_task_returns_contract_dict(worker):
    out = worker.extract(png_bytes(data.chelsea()), {})
    assert out["ok"] is True and set(out) == {"ok", "features"}
    f = DelfFeatures.from_wire(out["features"])
    assert f.image_size == (451, 300) and 0 < len(f) <= 1000 and f.dim == 40  # the effnet-lite0 fixture

    bad = worker.extract(b"not an image", {})
    assert bad == {"ok": False, "error": {"code": "INVALID_ARGUMENT", "message": bad["error"]["message"]}}
    assert worker.extract(None, {})["error"]["code"] == "INVALID_ARGUMENT"


def test_ingest_extract_task_with_bytes_and_location(worker, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(png_bytes(data.chelsea()))
    monkeypatch.setenv("DELF_INGEST_ROOTS", str(root))

    jobs = worker._job_store()
    job = jobs.create()
    out = worker.ingest_extract({"image_id": "a", "metadata": {"k": "v"}, "image": png_bytes(data.coffee()),
                                 "location": None}, job)
    assert out == {"ok": True, "image_id": "a", "parked": True}  # the index step reads the rest from the job
    kept = jobs.parked(job, "a")
    assert kept["metadata"] == {"k": "v"} and DelfFeatures.from_wire(kept["features"]).image_size == (600, 400)
    assert kept["thumbnail"][:2] == b"\xff\xd8"  # a JPEG, stored with the photo by the index step

    out = worker.ingest_extract({"image_id": "b", "metadata": {}, "image": None, "location": "sub/cat.png"}, job)
    assert out["ok"] and DelfFeatures.from_wire(jobs.parked(job, "b")["features"]).image_size == (451, 300)

    out = worker.ingest_extract({"image_id": "c", "metadata": {}, "image": None,
                                 "location": "sub/missing.png"}, job)
    assert out == {"ok": False, "image_id": "c", "error": {"code": "NOT_FOUND", "message": out["error"]["message"]}}

    out = worker.ingest_extract({"image_id": "d", "metadata": {}, "image": b"\x89PNG broken", "location": None},
                                job)
    assert not out["ok"] and out["image_id"] == "d" and out["error"]["code"] == "INVALID_ARGUMENT"
    assert jobs.parked_ids(job) == {"a", "b"}  # errors are not parked
    jobs.cancel(job)  # drops what is parked
    assert not jobs.parked_ids(job)


@pytest.fixture
def ingest_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(b"inside")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"outside")
    (root / "escape.png").symlink_to(outside)
    (root / "escape_dir").symlink_to(tmp_path)
    (root / "inner_link.png").symlink_to(root / "ok.png")
    monkeypatch.setenv("DELF_INGEST_ROOTS", str(root))
    return root


def test_location_inside_root_is_read(ingest_root):
    assert read_location("ok.png") == b"inside"
    assert read_location(str(ingest_root / "ok.png")) == b"inside"
    assert read_location("inner_link.png") == b"inside"  # a symlink staying inside is fine


@pytest.mark.parametrize("location, code, words", [
    ("../secret.png", "INVALID_ARGUMENT", "'..'"),
    ("sub/../../secret.png", "INVALID_ARGUMENT", "'..'"),
    ("escape.png", "INVALID_ARGUMENT", "symbolic link"),
    ("escape_dir/secret.png", "INVALID_ARGUMENT", "symbolic link"),
    ("/etc/passwd", "INVALID_ARGUMENT", "outside the ingest roots"),
    ("http://example.com/a.jpg", "INVALID_ARGUMENT", "local file"),
    ("nothere.png", "NOT_FOUND", "not found"),
    (".", "INVALID_ARGUMENT", "not a regular file"),
])
def test_location_confinement(ingest_root, location, code, words):
    with pytest.raises(ImageRejected) as err:
        read_location(location)
    assert err.value.code == code and words in err.value.message


def test_location_absolute_outside_root_via_task(worker, ingest_root, tmp_path):
    out = worker.ingest_extract({"image_id": "x", "metadata": {}, "image": None,
                                 "location": str(tmp_path / "secret.png")}, "job")
    assert out["ok"] is False and out["image_id"] == "x" and out["error"]["code"] == "INVALID_ARGUMENT"


def test_location_byte_limit_and_empty_roots(ingest_root, monkeypatch):
    monkeypatch.setenv("DELF_MAX_IMAGE_BYTES", "3")
    with pytest.raises(ImageRejected) as err:
        read_location("ok.png")
    assert err.value.code == "RESOURCE_EXHAUSTED" and "DELF_MAX_IMAGE_BYTES" in err.value.message
    monkeypatch.setenv("DELF_INGEST_ROOTS", "")
    with pytest.raises(ImageRejected, match="DELF_INGEST_ROOTS is empty"):
        read_location("ok.png")
