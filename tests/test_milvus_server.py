"""DescriptorStore against a real Milvus server (PyPI package `milvus`, server 2.3.5).

The server keeps state in its base dir; a restart on the same folder crashed before,
so every run gets a fresh tmp folder. Ports are picked free by the package.
"""
import time

import numpy as np
import pytest

from delf_common.features import decode_array

from test_indexer import feats, noisy, rows
from test_thumbnails import thumbnail_story

milvus = pytest.importorskip("milvus", reason="the `milvus` server package is not installed")


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    from milvus import MilvusServer

    server = MilvusServer()
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus_server")))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - environment-specific
        server.stop()
        pytest.skip(f"the Milvus server did not start: {exc}")
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_store_on_server(server_uri):
    from delf_indexer.backends.base import StorageBackend
    from delf_indexer.store import DescriptorStore

    s = DescriptorStore(server_uri, token="root:Milvus", collection=f"srv{int(time.time())}")
    try:
        assert s.backend.kind == "server" and s.index.index_type == "HNSW"
        assert isinstance(s.backend, StorageBackend)
        version = s.client.get_server_version()
        assert "2.3" in version
        images = {f"img{i}": feats(150, 20 + i) for i in range(4)}
        for k, f in images.items():
            s.add(k, f, {"k": k})
        odd = 'we"ird \\ ïd'
        s.add(odd, feats(40, 50), {})
        assert s.stats() == {"images": 5, "descriptors": 640, "pca_id": "pca-a"}
        assert rows(s, odd) == 40

        # the server reports squared L2: the store takes the square root
        q = images["img1"].descriptors[:1]
        hit = s.client.search(s.features_name, data=q + 0.01, limit=1, anns_field="desc",
                              search_params={"metric_type": "L2", "params": {"ef": 64}})[0][0]
        true_d = float(np.linalg.norm(q + 0.01 - q))
        assert abs(hit["distance"] - true_d ** 2) < 1e-4 and s.index.squared_l2

        query = noisy(images["img1"], 0.03, 1)
        cands = s.search(query, shortlist=2)
        assert cands[0]["image_id"] == "img1" and cands[0]["votes"] > 0.9 * len(query)
        qidx, xy = decode_array(cands[0]["query_idx"]), decode_array(cands[0]["db_xy"])
        right = np.all(np.abs(xy - images["img1"].locations[qidx]) < 1e-3, axis=1)
        assert right.mean() > 0.95
        np.testing.assert_allclose(decode_array(cands[0]["db_scale"])[right],
                                   images["img1"].scales[qidx[right]], rtol=1e-6)

        # replace: same image count, exactly the new rows
        s.add("img1", feats(70, 99), {"k": "new"})
        assert s.stats()["images"] == 5 and rows(s, "img1") == 70
        assert s.get("img1")["metadata"] == {"k": "new"}
        assert s.delete(odd) == 40 and rows(s, odd) == 0
        with pytest.raises(KeyError):
            s.get(odd)
        with pytest.raises(ValueError, match="pca_id"):
            s.add("z", feats(10, 1, pca="pca-b"))
        info, f = s.get_features("img2")
        np.testing.assert_allclose(f.descriptors, images["img2"].descriptors, atol=1e-6)
    finally:
        for name in (s.features_name, s.images_name, s.thumbnails.name):
            if s.client.has_collection(name):
                s.client.drop_collection(name)
        s.close()


@pytest.mark.timeout(180)
def test_thumbnails_on_server(server_uri):
    """The thumbnails' story of tests/test_thumbnails.py on a Milvus server."""
    from delf_indexer.store import DescriptorStore

    name = f"thumb{int(time.time())}"
    thumbnail_story(lambda: DescriptorStore(server_uri, token="root:Milvus", collection=name))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index_type, search_key", [("IVF_SQ8", "nprobe"), ("IVF_PQ", "nprobe")])
def test_server_index_chosen_per_deployment(server_uri, monkeypatch, index_type, search_key):
    """DELF_MILVUS_INDEX picks the server collection's index; a store opened later with
    another choice searches the collection with the index it actually has."""
    from delf_indexer.store import DescriptorStore

    monkeypatch.setenv("DELF_MILVUS_INDEX", index_type)
    monkeypatch.setenv("DELF_MILVUS_SEARCH_PARAMS", '{"%s": 64}' % search_key)
    monkeypatch.setenv("DELF_MILVUS_INDEX_PARAMS", '{"nlist": 256}')
    name = f"idx{index_type.lower()}{int(time.time())}"
    s = DescriptorStore(server_uri, token="root:Milvus", collection=name)
    try:
        images = {f"img{i}": feats(300, 60 + i) for i in range(3)}
        for k, f in images.items():
            s.add(k, f)
        built = s.client.describe_index(s.features_name, "desc")
        assert built["index_type"] == index_type and int(built["nlist"]) == 256
        if index_type == "IVF_PQ":
            assert int(built["m"]) == 10  # 40-d descriptors, 4-d sub-vectors
        assert s.index.search_params[search_key] == 64
        query = noisy(images["img2"], 0.03, 2)
        cands = s.search(query, shortlist=2)
        assert cands[0]["image_id"] == "img2" and cands[0]["votes"] > 0.5 * len(query)

        monkeypatch.setenv("DELF_MILVUS_INDEX", "HNSW")
        monkeypatch.delenv("DELF_MILVUS_SEARCH_PARAMS")
        later = DescriptorStore(server_uri, token="root:Milvus", collection=name)
        try:
            assert later.index.index_type == index_type and "ef" not in later.index.search_params
            assert later.search(query, shortlist=2)[0]["image_id"] == "img2"
        finally:
            later.close()
    finally:
        for n in (s.features_name, s.images_name):
            if s.client.has_collection(n):
                s.client.drop_collection(n)
        s.close()
