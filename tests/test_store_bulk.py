"""The store's scale levers against a real Milvus Lite file: descriptors kept per photo
(DELF_STORED_FEATURES) and the bulk path (add_many)."""
import numpy as np
import pytest

from delf_indexer.checks import quote
from delf_indexer.store import DescriptorStore
from test_indexer import feats, noisy, rows


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_STORED_FEATURES", "50")
    s = DescriptorStore(str(tmp_path / "bulk.db"), collection="b")
    yield s
    s.close()


def test_a_photo_keeps_its_best_scored_descriptors(store):
    f = feats(200, 1)
    info = store.add("p", f, {})
    assert info["num_features"] == 50 == rows(store, "p") == store.get("p")["num_features"]
    _, kept = store.get_features("p")
    best = np.sort(np.argsort(-f.scores)[:50])
    np.testing.assert_allclose(kept.scores, f.scores[best])
    np.testing.assert_allclose(kept.descriptors, f.descriptors[best], atol=1e-6)
    # A query keeps all its descriptors: a noisy copy of the photo still finds it first.
    assert store.search(noisy(f, 0.02, 2), shortlist=3)[0]["image_id"] == "p"


def test_all_descriptors_kept_with_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_STORED_FEATURES", "0")
    with DescriptorStore(str(tmp_path / "all.db"), collection="a") as s:
        assert s.add("p", feats(200, 1), {})["num_features"] == 200 == rows(s, "p")


def test_add_many_indexes_each_photo_once_and_replaces_atomically(store):
    first = store.add_many([(f"i{k}", feats(80, k), {"k": str(k)}) for k in range(6)])
    assert [i["image_id"] for i in first] == [f"i{k}" for k in range(6)]
    assert store.stats()["images"] == 6 and store.stats()["descriptors"] == 6 * 50
    # Replace two of them (and add one) in one call: each keeps only its new generation.
    store.add_many([("i1", feats(80, 101), {"k": "new"}), ("i6", feats(80, 6), {}),
                    ("i4", feats(30, 104), {})])
    assert store.stats() == {"images": 7, "descriptors": 5 * 50 + 50 + 30, "pca_id": "pca-a"}
    for image_id, n in (("i1", 50), ("i4", 30), ("i0", 50)):
        gens = {h["generation"] for h in store.client.query(
            store.features_name, filter=f"image_id == {quote(image_id)}", output_fields=["generation"])}
        assert rows(store, image_id) == n and len(gens) == 1
    assert store.get("i1")["metadata"] == {"k": "new"}
    assert store.search(noisy(feats(80, 101), 0.02, 3), shortlist=2)[0]["image_id"] == "i1"


def test_add_many_with_one_bad_photo_writes_nothing(store):
    store.add("keep", feats(80, 1), {})
    before = store.stats()
    bad = feats(80, 3)
    bad.descriptors[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.add_many([("new1", feats(80, 2), {}), ("new2", bad, {})])
    with pytest.raises(ValueError, match="different PCAs"):
        store.add_many([("new3", feats(80, 4), {}), ("new4", feats(80, 5, pca="pca-b"), {})])
    with pytest.raises(ValueError, match="index holds pca_id 'pca-a'"):
        store.add_many([("new5", feats(80, 6, pca="pca-b"), {}), ("new6", feats(80, 7, pca="pca-b"), {})])
    assert store.stats() == before


def test_add_many_with_a_repeated_id_keeps_the_last(store):
    store.add_many([("x", feats(80, 1), {"v": "1"}), ("y", feats(80, 2), {}), ("x", feats(80, 3), {"v": "3"})])
    assert store.get("x")["metadata"] == {"v": "3"}
    assert rows(store, "x") == 50 and store.stats()["images"] == 2


def _all_rows(store) -> list[tuple]:
    """Every descriptor row as comparable values (no primary key)."""
    got = []
    for image_id in sorted({h["image_id"] for h in store.client.query(
            store.features_name, filter="idx >= 0", output_fields=["image_id"], limit=16384)}):
        for h in store.client.query(store.features_name, filter=f"image_id == {quote(image_id)}",
                                    output_fields=["image_id", "idx", "x", "y", "scale", "score", "desc"]):
            got.append((h["image_id"], h["idx"], round(h["x"], 3), round(h["y"], 3), round(h["scale"], 5),
                        round(h["score"], 5), tuple(np.round(np.asarray(h["desc"], np.float32), 5))))
    return sorted(got)


def test_direct_lite_insert_writes_what_the_api_writes_and_survives_a_reopen(tmp_path, monkeypatch):
    """DELF_LITE_DIRECT_INSERT (the default) writes columns straight into Lite: the rows, the
    search answers and the stats are those of Lite's insert API, and they are there after the
    file is closed and opened again (its write-ahead log)."""
    monkeypatch.setenv("DELF_STORED_FEATURES", "40")
    photos = [(f"d{k}", feats(60 + k, k), {"k": str(k)}) for k in range(5)]
    answers = {}
    for direct in ("1", "0"):
        monkeypatch.setenv("DELF_LITE_DIRECT_INSERT", direct)
        path = str(tmp_path / f"direct{direct}.db")
        with DescriptorStore(path, collection="c") as s:
            assert s.backend.direct_insert is (direct == "1")
            s.add_many(photos[:3])
            s.add("d1", feats(70, 11), {})  # a replacement, one photo per call
            s.add_many(photos[3:])
            top = s.search(noisy(feats(70, 11), 0.02, 5), shortlist=3)
            assert s.backend.direct_rows == (6 * 40 if direct == "1" else 0)
        with DescriptorStore(path, collection="c") as s:  # reopened: rows come back from disk
            answers[direct] = (s.stats(), _all_rows(s), [t["image_id"] for t in top],
                               [t["image_id"] for t in s.search(noisy(feats(63, 3), 0.02, 6), shortlist=3)])
    assert answers["1"][0] == {"images": 5, "descriptors": 5 * 40, "pca_id": "pca-a"}
    assert answers["1"] == answers["0"]
    assert answers["1"][2][0] == "d1" and answers["1"][3][0] == "d3"


def test_fast_memtable_flush_builds_the_table_lite_builds(tmp_path, monkeypatch):
    """The flush builder the store installs gives Lite's own table, row for row, also
    for rows from several insert batches out of order (a replaced primary key)."""
    from milvus_lite.storage.memtable import MemTable

    from delf_indexer.backends.lite_patches import _take_rows

    monkeypatch.setenv("DELF_STORED_FEATURES", "0")
    with DescriptorStore(str(tmp_path / "flush.db"), collection="f") as s:
        for k in range(3):
            s.add_many([(f"m{k}{j}", feats(30 + j, 10 * k + j), {}) for j in range(2)])
        memtable = s.backend.fast._engine()._memtable
        rows = [(b, r) for b, batch in enumerate(memtable._insert_batches) for r in range(batch.num_rows)]
        assert len(memtable._insert_batches) >= 3 and len(rows) == sum(2 * 30 + 1 for _ in range(3))
        shuffled = rows[40:] + rows[:40]
        lite_own = MemTable._build_data_table._delf_original
        for picked in (rows, shuffled, rows[5:9]):
            ours = MemTable._build_data_table(memtable, picked)
            assert ours.equals(_take_rows(memtable._insert_batches, picked, memtable._data_schema))
            for theirs in (lite_own(memtable, picked), _lite_build(memtable, picked)):
                assert ours.schema == theirs.schema and ours.equals(theirs)


def _lite_build(memtable, rows):
    """Lite's own construction: one Python object per cell (what its builder does)."""
    import pyarrow as pa

    cols = {name: [] for name in memtable._data_schema.names}
    for b, r in rows:
        for name in cols:
            cols[name].append(memtable._insert_batches[b].column(name)[r].as_py())
    return pa.Table.from_pydict(cols, schema=memtable._data_schema)


@pytest.mark.parametrize("points", [4, 0])
def test_lite_trains_its_ivf_lists_on_the_configured_sample(tmp_path, monkeypatch, points):
    """DELF_LITE_TRAIN_POINTS reaches the k-means of every segment index Lite builds (0:
    Lite's own, faiss' 256 per list), every row is still indexed, and photos are found."""
    import faiss

    monkeypatch.setenv("DELF_LITE_NLIST", "8")
    monkeypatch.setenv("DELF_LITE_TRAIN_POINTS", str(points))
    monkeypatch.setenv("DELF_STORED_FEATURES", "0")
    with DescriptorStore(str(tmp_path / "train.db"), collection="t") as s:
        photos = {f"p{k}": feats(300, 40 + k) for k in range(4)}
        s.add_many(list((k, f, {}) for k, f in photos.items()))
        for k, f in photos.items():
            assert s.search(noisy(f, 0.02, 1), shortlist=1)[0]["image_id"] == k
        segments, _ = s.backend.snapshot()
        built = [(seg.num_rows, seg.indexes["desc"]._index) for seg in segments if seg.num_rows]
        assert sum(rows for rows, _ in built) == 4 * 300
        for rows, index in built:
            assert isinstance(index, faiss.IndexIVFScalarQuantizer) and index.ntotal == rows
            assert index.cp.max_points_per_centroid == (points or 256)
    assert isinstance(faiss.IndexIVFScalarQuantizer, type)  # faiss itself is untouched


def test_training_sample_declines_other_lite_internals(monkeypatch):
    """When Lite's index modules do not hold faiss as expected, nothing is patched."""
    import milvus_lite.index.faiss_ivf_flat as flat_module
    import milvus_lite.index.faiss_ivf_sq8 as sq8_module

    from delf_indexer.backends.lite_patches import sample_training

    before = sq8_module.faiss
    monkeypatch.setattr(flat_module, "faiss", object())
    assert sample_training(16) is False
    assert sq8_module.faiss is before


def test_settle_waits_for_lite_s_index_build_however_long_and_a_search_does_not(tmp_path, monkeypatch, caplog):
    """`settle()` (bulk loads, benchmarks) returns only once Lite's background index build is
    done, saying so each minute; a bounded wait gives up after its timeout with a warning,
    and a search does not wait at all: it searches what is not indexed yet exactly."""
    import concurrent.futures
    import logging

    with DescriptorStore(str(tmp_path / "wait.db"), collection="w") as s:
        s.add("a", feats(200, 5), {})
        engine = s.backend.fast._engine()
        own, calls = engine._wait_for_bg, []

        def slow(timeout=None):  # a build that outlasts three waits
            calls.append(timeout)
            if len(calls) <= 3:
                raise concurrent.futures.TimeoutError()
            own(timeout=timeout)

        monkeypatch.setattr(engine, "_wait_for_bg", slow)
        with caplog.at_level(logging.INFO, logger="delf_indexer.backends.lite_fast"):
            s.settle()
        assert len(calls) == 4 and calls[0] == 60.0
        assert sum("still indexing" in r.getMessage() for r in caplog.records) == 3
        calls.clear()
        assert s.backend.fast.wait_for_index(timeout=0.0) is False
        assert any("exactly" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        s.add("b", feats(200, 6), {})
        calls.clear()
        assert s.search(noisy(feats(200, 6), 0.02, 1), shortlist=1)[0]["image_id"] == "b"
        assert calls == []  # the search flushed and read the new segment unindexed: no wait
