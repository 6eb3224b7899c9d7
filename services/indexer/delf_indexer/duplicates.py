"""Identical photos, by the sha256 of their bytes as submitted (``hashes``).

Two questions, asked before a photo is indexed:

* ``known``: the gateway, before it sends an ingest item's bytes to the extractor, asks
  whether that id already holds those bytes with that metadata (**unchanged**: the item is
  done without extraction: a folder ingested again costs a hash and a look-up per photo),
  and which other ids hold them (**duplicates**).
* ``duplicate_of``: the indexer, about to index a photo, asks which other ids hold its
  bytes; ``DELF_DUPLICATES`` (``index`` or ``skip``) says whether it is indexed anyway.
  Either way the answer says so (AddImage's ``ImageInfo.duplicate_of``, the job's counts).
"""
from __future__ import annotations

from delf_common.contract import metadata_text
from delf_indexer.hashes import check_sha256


def skip_duplicates(store) -> bool:
    """Whether a photo identical to one indexed under another id is left out (DELF_DUPLICATES)."""
    return store.settings.skip_duplicates


def duplicate_of(store, image_id: str, sha256: str) -> list[str]:
    """The other ids (sorted) under which these bytes are indexed."""
    sha256 = check_sha256(sha256)
    if not sha256:
        return []
    with store._lock:
        return [i for i in store.hashes.ids_of([sha256]).get(sha256, []) if i != image_id]


def known(store, items: list[dict]) -> dict[str, dict]:
    """For each {image_id, sha256, metadata}: {"unchanged": the id holds these bytes and this
    metadata, "duplicate_of": the other ids that hold these bytes}. ValueError for a
    malformed hash or metadata."""
    wanted = []
    for item in items:
        _, text = metadata_text(item.get("metadata") or {})
        wanted.append((str(item["image_id"]), check_sha256(item.get("sha256")), text))
    with store._lock:
        held = store.hashes.of_ids(i for i, h, _ in wanted if h)
        same = store.hashes.ids_of(h for _, h, _ in wanted)
        same_id = [i for i, h, _ in wanted if h and held.get(i) == h]
        rows = store._image_rows(same_id)
    out = {}
    for image_id, sha256, text in wanted:
        row = rows.get(image_id)
        unchanged = row is not None and (row.get("metadata") or "") == text
        out[image_id] = {"unchanged": unchanged,
                         "duplicate_of": [i for i in same.get(sha256, []) if i != image_id]}
    return out
