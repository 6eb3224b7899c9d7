"""Issue 22 item 3: ListImages pages through 10,000 images without repeating or skipping
one, through the real gateway, indexer and Milvus Lite, with deletes and adds between pages.

10,000 photos through extraction would take an hour here, so the index is filled the way
scripts/bench_scale.py fills one: the store's bulk path (`DescriptorStore.add_many`, what
the indexer's add calls) writes 10,000 images of three descriptors each, with the shipped
PCA's id and dimension, into the Milvus Lite file of a system of the test's own; then the
system starts on that data and everything else goes through gRPC: the listing, a delete
before and after the cursor, and an add of a real photo (extracted by the system) before
and after it."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import RunningSystem, redis_available, redis_db_url, system_env
from photos import jpeg, sample_photo

pytestmark = pytest.mark.slow
IMAGES = 10_000
# A few ids whose order differs between naive orders: upper case, accents, CJK (UTF-8 byte
# order and code point order agree; a page token is compared the same way).
ODD_IDS = ["Z-upper", "a-lower", "p04999~", "é-accent", "日本-cjk"]


def _fill(data_dir: Path, collection: str) -> list[str]:
    from delf_common import config
    from delf_common.features import DelfFeatures
    from delf_extractor import models
    from delf_extractor import pca as pca_mod
    from delf_indexer.store import DescriptorStore

    shipped = pca_mod.load_pca(pca_mod.configured_path(models.get_config(config.get("DELF_MODEL"))))
    rng = np.random.default_rng(22)
    ids = [f"p{k:05d}" for k in range(IMAGES - len(ODD_IDS))] + ODD_IDS
    order = rng.permutation(len(ids))  # written in no particular order

    def features() -> DelfFeatures:
        d = rng.standard_normal((3, shipped.dim)).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return DelfFeatures(rng.random((3, 2), dtype=np.float32) * 60, np.ones(3, np.float32),
                            np.ones(3, np.float32), d, (64, 64), shipped.model, shipped.pca_id)

    with DescriptorStore(str(data_dir / "milvus.db"), collection=collection) as store:
        for start in range(0, len(ids), 1000):
            store.add_many([(ids[k], features(), {"tenth": str(k % 10)}) for k in order[start:start + 1000]])
        store.settle()
    return ids


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    if not redis_available(redis_db_url()):
        pytest.fail(f"no Redis at {redis_db_url()}")
    root = tmp_path_factory.mktemp("listing-scale")
    env = system_env(root)
    ids = _fill(Path(env["DELF_DATA_DIR"]), env["DELF_COLLECTION"])
    running = RunningSystem(root, env)
    running.start()
    yield running, ids
    running.stop()
    shutil.rmtree(root / "data", ignore_errors=True)


def test_list_images_pages_through_10000_without_repeat_or_skip(filled):
    system, ids = filled
    photo = jpeg(sample_photo("coffee")[::2, ::2].copy())
    with system.client(timeout=300) as client:
        assert client.stats().images == IMAGES
        first = client.list_images()  # page_size 0: 100
        assert [i.image_id for i in first.images] == sorted(ids)[:100]
        assert first.next_page_token == sorted(ids)[99] and first.images[0].num_features == 3

        listed, token, pages = [], "", 0
        while True:
            page = client.list_images(page_size=1000, page_token=token)
            listed += [i.image_id for i in page.images]
            token, pages = page.next_page_token, pages + 1
            if pages == 3:  # between pages: delete and add before and after the cursor
                assert token == sorted(ids)[2999] == listed[-1]
                client.delete_image("p01500")        # listed already: stays listed once
                client.delete_image("p05000")        # not reached yet: never listed
                client.add_image("p00000-late", photo)  # before the cursor: not listed
                client.add_image(token + "-late", photo)  # just after the cursor: listed next
            if not token:
                break
        expected = sorted((set(ids) - {"p05000"}) | {sorted(ids)[2999] + "-late"})
        assert len(listed) == len(set(listed)), "an image was listed twice"
        assert listed == expected, (sorted(set(expected) - set(listed))[:5], sorted(set(listed) - set(expected))[:5])
        assert pages == 10  # 10,000 images in pages of 1000: the last one is full and says no more

        tenth = [i.image_id for i in client.iter_images(page_size=999, filter={"tenth": "3"})]
        assert tenth == sorted(tenth) and len(tenth) == len({i for i in tenth})
        assert tenth == [i.image_id for i in _all(client) if i.metadata.get("tenth") == "3"]


def _all(client):
    return list(client.iter_images(page_size=1000))
