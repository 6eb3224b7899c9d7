"""The code every service shares: configuration, wire formats, photo checks, jobs."""
from __future__ import annotations

import io
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis
from PIL import Image

from delf_common import config
from delf_common.features import DelfFeatures, decode_array, encode_array
from delf_common.images import ImageLimits, ImageRejected, decode_image, probe_image
from delf_common.jobs import COMPLETED, RECEIVING, RUNNING, JobStore
from conftest import redis_db_url
from photos import jpeg, png, sample_photo

CONFIGURATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIGURATION.md"


def test_configuration_doc_documents_every_setting_as_the_code_defines_it():
    assert config.CONFIGURATION_DOC == CONFIGURATION_DOC
    assert config.markdown_table() in CONFIGURATION_DOC.read_text(), (
        "docs/CONFIGURATION.md's settings table is stale: run `python -m delf_common.config --write-docs`")


def test_settings_parse_from_the_environment(monkeypatch):
    monkeypatch.setenv("DELF_SHORTLIST", "7")
    monkeypatch.setenv("DELF_INGEST_ROOTS", "/a:/b")
    assert config.get("DELF_SHORTLIST") == 7
    assert config.get("DELF_INGEST_ROOTS") == ("/a", "/b")
    monkeypatch.setenv("DELF_RATIO", "zero point nine")
    with pytest.raises(config.ConfigError, match="DELF_RATIO"):
        config.get("DELF_RATIO")
    monkeypatch.delenv("DELF_MILVUS_URI", raising=False)
    monkeypatch.setenv("DELF_DATA_DIR", "/tmp/x")
    assert config.milvus_uri() == "/tmp/x/milvus.db"


def random_features(n: int, dim: int = 40) -> DelfFeatures:
    rng = np.random.default_rng(n)
    d = rng.normal(size=(n, dim)).astype(np.float32)
    return DelfFeatures(
        locations=rng.uniform(0, 500, (n, 2)), scales=rng.uniform(0.5, 4, n), scores=rng.uniform(0, 9, n),
        descriptors=d / np.linalg.norm(d, axis=1, keepdims=True), image_size=(640, 480),
        model="m", pca_id="p",
    )


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_features_survive_the_wire_bit_for_bit(n):
    f = random_features(n)
    back = DelfFeatures.from_wire(msgpack.unpackb(msgpack.packb(f.to_wire(), use_bin_type=True), raw=False))
    for name in ("locations", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(back, name), getattr(f, name))
    assert (back.image_size, back.model, back.pca_id, len(back)) == ((640, 480), "m", "p", n)


def test_box_keeps_only_features_inside_it():
    f = random_features(500)
    inside = f.inside((100, 200, 300, 400))
    x, y = inside.locations.T
    assert len(inside) > 0 and np.all((x >= 100) & (x < 300) & (y >= 200) & (y < 400))
    assert len(inside) == int(np.sum((f.locations[:, 0] >= 100) & (f.locations[:, 0] < 300)
                                     & (f.locations[:, 1] >= 200) & (f.locations[:, 1] < 400)))


def test_arrays_keep_dtype_and_shape():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    b = decode_array(msgpack.unpackb(msgpack.packb(encode_array(a)), raw=False))
    assert b.dtype == np.int32 and b.shape == (3, 4) and np.array_equal(a, b)


def test_photo_decodes_with_exif_orientation_applied():
    rgb = sample_photo("chelsea")  # 451 x 300
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), ImageLimits.from_env()).shape == (451, 300, 3)
    assert probe_image(png(rgb), ImageLimits.from_env())[:2] == (451, 300)


@pytest.mark.parametrize("data,code", [
    (b"", "INVALID_ARGUMENT"),
    (b"hello world" * 10, "INVALID_ARGUMENT"),
    (None, "INVALID_ARGUMENT"),  # truncated
])
def test_bad_photos_are_rejected_with_a_status(data, code):
    if data is None:
        data = jpeg(sample_photo("rocket"))[:4000]
    with pytest.raises(ImageRejected) as err:
        decode_image(data, ImageLimits.from_env())
    assert err.value.code == code and err.value.message


def test_pixel_and_byte_limits():
    """The limits are the caller's (a service's settings), whatever the environment says."""
    with pytest.raises(ImageRejected, match="pixels") as err:
        probe_image(png(np.zeros((64, 64, 3), np.uint8)), ImageLimits(max_bytes=10**6, max_pixels=1000, min_side=32))
    assert err.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ImageRejected, match="bytes") as err:
        probe_image(jpeg(sample_photo("chelsea")), ImageLimits(max_bytes=100, max_pixels=10**8, min_side=32))
    assert err.value.code == "RESOURCE_EXHAUSTED"


@pytest.fixture
def jobs(monkeypatch):
    monkeypatch.setenv("DELF_QUEUE_PREFIX", f"jobtest-{uuid.uuid4().hex[:6]}")
    client = redis.Redis.from_url(redis_db_url(15))
    try:
        client.ping()
    except redis.RedisError:
        pytest.fail(f"no Redis at {redis_db_url(15)}")
    return JobStore(client)


def test_job_counts_each_item_once_and_completes(jobs):
    job = jobs.create()
    assert jobs.get(job).state == RECEIVING
    jobs.mark_done(job, "a")
    jobs.mark_done(job, "a")  # a redelivered task
    jobs.mark_failed(job, "b", "not a photo")
    jobs.mark_failed(job, "a", "late failure of a finished item")  # ignored
    assert jobs.get(job).state == RECEIVING  # the stream has not ended
    jobs.set_total(job, 3)
    status = jobs.get(job)
    assert (status.state, status.done, status.failed) == (RUNNING, 1, 1)
    assert status.errors == [("b", "not a photo")]
    jobs.mark_failed(job, "c", "x")
    jobs.mark_done(job, "c")  # a retry that succeeded replaces the failure
    status = jobs.get(job)
    assert (status.state, status.done, status.failed, status.errors) == (COMPLETED, 2, 1, [("b", "not a photo")])
    assert jobs.get("missing") is None


def test_average_precision_and_queries_follow_the_protocol(tmp_path):
    from delf_tools.evaluation import average_precision, queries_and_positives, read_manifest

    assert average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision(["x", "a"], {"a", "b"}) == pytest.approx((1 / 2) / 2)  # b never returned
    manifest = tmp_path / "MANIFEST.tsv"
    manifest.write_text("path\tgroup\twidth\ng1/a.jpg\tg1\t1\ng1/b.jpg\tg1\t1\nlone/c.jpg\tlone\t1\n")
    rows = read_manifest(manifest)
    assert rows == [("g1/a.jpg", "g1"), ("g1/b.jpg", "g1"), ("lone/c.jpg", "lone")]
    assert queries_and_positives({p: g for p, g in rows}) == {"g1/a.jpg": {"g1/b.jpg"}, "g1/b.jpg": {"g1/a.jpg"}}
