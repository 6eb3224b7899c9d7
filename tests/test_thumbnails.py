"""The thumbnails the index keeps (issue 15, item 2) and the inliers the verifier reports
(item 1), below the gateway: the extractor's bounded JPEG, the store's thumbnails
collection on Milvus Lite (tests/test_milvus_server.py runs the same story on a server),
and `delf.verify` saying which correspondences are inliers only when asked."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from delf_common import config
from delf_common.images import THUMBNAIL_MAX_BYTES, thumbnail_jpeg
from delf_common.messages import VerifiedMatch
from delf_indexer.store import DescriptorStore
from photos import sample_photo
from test_indexer import feats


def jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG"
        return im.size


def test_thumbnail_is_a_bounded_jpeg_of_the_photo():
    photo = sample_photo("coffee")  # 600 x 400
    thumb = thumbnail_jpeg(photo, 320)
    assert jpeg_size(thumb) == (320, 213) and len(thumb) <= THUMBNAIL_MAX_BYTES
    assert jpeg_size(thumbnail_jpeg(photo, 1024)) == (600, 400)  # never enlarged
    assert thumbnail_jpeg(photo, 0) == b""
    # Noise barely compresses: the byte bound wins over the side (lower quality, then smaller).
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    big = thumbnail_jpeg(noise, 1024)
    assert len(big) <= THUMBNAIL_MAX_BYTES and max(jpeg_size(big)) <= 1024


def test_thumbnail_side_setting(monkeypatch):
    from delf_extractor.settings import ExtractorSettings

    monkeypatch.setenv("DELF_THUMBNAIL_SIDE", "200")
    side = ExtractorSettings.from_env().thumbnail_side  # the extractor's, read once
    assert side == 200 and max(jpeg_size(thumbnail_jpeg(sample_photo("coffee"), side))) == 200
    monkeypatch.setenv("DELF_THUMBNAIL_SIDE", "4000")
    with pytest.raises(config.ConfigError, match="DELF_THUMBNAIL_SIDE"):
        config.get("DELF_THUMBNAIL_SIDE")


def thumbnail_story(open_store) -> None:
    """Stored with the photo, replaced by a re-add, dropped by a re-add without one and by
    a delete, kept across a reopen (a restart of the indexer)."""
    a, b = thumbnail_jpeg(sample_photo("coffee"), 160), thumbnail_jpeg(sample_photo("rocket"), 160)
    s = open_store()
    try:
        s.add_many([("p1", feats(30, 1), {}, a), ("p2", feats(30, 2), {})])
        assert s.get("p1", thumbnail=True)["thumbnail"] == a
        assert "thumbnail" not in s.get("p1")  # only when asked
        assert s.get("p2", thumbnail=True)["thumbnail"] == b""
        s.add_many([("p1", feats(30, 3), {}, b)])
        assert s.get("p1", thumbnail=True)["thumbnail"] == b
        s.add_many([("p2", feats(30, 4), {}, a)])
    finally:
        s.close()
    s = open_store()  # a restart
    try:
        assert s.get("p1", thumbnail=True)["thumbnail"] == b and s.get("p2", thumbnail=True)["thumbnail"] == a
        s.add("p2", feats(30, 5))  # re-added without a thumbnail: the old one is not this photo's
        assert s.get("p2", thumbnail=True)["thumbnail"] == b"" and s.thumbnails.count() == 1
        s.delete("p1")
        assert s.thumbnails.count() == 0 and s.thumbnails.get("p1") == b""
    finally:
        s.close()


def test_thumbnails_on_milvus_lite(tmp_path):
    thumbnail_story(lambda: DescriptorStore(str(tmp_path / "milvus.db"), collection="th"))


def test_a_store_made_before_thumbnails_gets_the_collection_on_its_first_add(tmp_path):
    s = DescriptorStore(str(tmp_path / "milvus.db"), collection="old")
    try:
        s.add("x", feats(20, 1))
        s.client.drop_collection(s.thumbnails.name)  # as an index from before this feature
    finally:
        s.close()
    s = DescriptorStore(str(tmp_path / "milvus.db"), collection="old")
    try:
        assert not s.thumbnails.exists and s.get("x", thumbnail=True)["thumbnail"] == b""
        s.delete("x")  # no thumbnails collection: nothing to drop, no error
        s.add_many([("y", feats(20, 2), {}, thumbnail_jpeg(sample_photo("coffee"), 64))])
        assert s.thumbnails.exists and len(s.get("y", thumbnail=True)["thumbnail"]) > 0
    finally:
        s.close()


def test_verifier_reports_inliers_only_when_asked():
    from delf_verifier.tasks import verify_candidates

    from delf_common.features import encode_array

    rng = np.random.default_rng(3)
    q = rng.uniform(0, 400, (80, 2)).astype(np.float32)
    d = q * 1.2 + [15, -4]
    outliers = np.arange(0, 80, 4)
    d[outliers] = rng.uniform(0, 400, (len(outliers), 2))
    query = {"locations": encode_array(q), "image_size": [400, 400], "box": None}
    cand = {"image_id": "c", "votes": 80, "query_idx": encode_array(np.arange(80, dtype=np.int32)),
            "db_xy": encode_array(d.astype(np.float32))}
    plain = verify_candidates(query, [cand], {"min_inliers": 10})["matches"][0]
    asked = VerifiedMatch.from_wire(verify_candidates(query, [cand], {"min_inliers": 10, "inlier_idx": True})
                                    ["matches"][0])
    assert "inlier_idx" not in plain and VerifiedMatch.from_wire(plain).inlier_idx is None
    assert asked.verified and len(asked.inlier_idx) == asked.inliers == 60
    assert set(asked.inlier_idx.tolist()) == set(range(80)) - set(outliers.tolist())
    assert VerifiedMatch.from_wire(asked.to_wire()).inlier_idx.tolist() == asked.inlier_idx.tolist()
