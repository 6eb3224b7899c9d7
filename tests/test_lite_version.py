"""The Lite fast paths run only on the milvus-lite versions they were tested with
(`delf_indexer.backends.lite_version`); on another version the store uses Lite's public API, gives
the same answers, and says so once."""
import logging

import pytest

from delf_indexer.backends import lite_version
from delf_indexer.store import DescriptorStore
from test_indexer import feats, noisy


def test_the_pinned_lite_is_a_tested_version():
    # Bumping the pin without running the suite on the new version (and listing it) fails here.
    assert lite_version.installed_lite_version() in lite_version.TESTED_LITE_VERSIONS


@pytest.fixture
def untested_lite(monkeypatch):
    monkeypatch.setattr(lite_version, "installed_lite_version", lambda: "9.9.9")
    lite_version.lite_internals_allowed.cache_clear()
    yield
    lite_version.lite_internals_allowed.cache_clear()


def test_an_untested_lite_gets_the_public_api_and_one_warning(untested_lite, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="delf_indexer.backends.lite_version")
    with DescriptorStore(str(tmp_path / "a.db"), collection="a") as store:
        assert store.backend.fast is None and not store.backend.direct_insert
        for k in range(3):
            store.add(f"p{k}", feats(120, k), {"k": str(k)})
        hits = store.search(noisy(feats(120, 1), 0.02, 7), shortlist=3)
        assert hits[0]["image_id"] == "p1"
        assert store.stats()["images"] == 3 and store.get("p2")["metadata"] == {"k": "2"}
    with DescriptorStore(str(tmp_path / "b.db"), collection="b") as again:
        assert again.backend.fast is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "delf_indexer.backends.lite_version"]
    assert len(warnings) == 1 and "milvus-lite 9.9.9" in warnings[0] and "public API" in warnings[0]
