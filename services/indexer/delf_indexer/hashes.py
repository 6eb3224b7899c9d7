"""The indexed photos' content hashes: a side collection beside the images, for duplicates.

``<name>_hashes`` (``DELF_COLLECTION`` = ``<name>``) holds one row per photo indexed with
the bytes it was submitted as: ``image_id`` (pk), ``sha256`` (hex of those bytes) and a 2-d
dummy vector (Milvus wants a vector field in every collection). It lives in the same
Milvus as the rest (Lite file or server), so it survives restarts; the store writes a
photo's hash with its images row (an upsert: a re-added id gets the new one, a re-add
without bytes, features only, drops the old one) and deletes it with the photo. An index
created before hashes existed gets the collection on its first add; its older photos have
no hash (they are neither "unchanged" nor anyone's duplicate until added again).

Two questions are asked of it (``delf_indexer.duplicates``): which ids hold these bytes
(an identical photo under another id) and which hash an id holds (the same photo sent
again under its id: an unchanged folder ingested again).
"""
from __future__ import annotations

import re
from typing import Iterable

from delf_indexer.checks import quote
from delf_indexer.side_collections import DUMMY, KeyedCollection

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
LOOKUP_CHUNK = 500


def check_sha256(value) -> str:
    """A lower-case hex sha256, or "" for none; ValueError for anything else."""
    text = str(value or "").lower()
    if text and not SHA256_HEX.fullmatch(text):
        raise ValueError(f"not a hex sha256: {str(value)[:80]!r}")
    return text


class HashStore(KeyedCollection):
    """The hashes collection of one index (``client``: the store's MilvusClient)."""

    field = "sha256"
    max_length = 64

    def write(self, hashes: dict[str, str], replaced: Iterable[str] = ()) -> None:
        """Store these photos' hashes (replacing any), and drop the old hash of each
        ``replaced`` id that comes without one now."""
        rows = [{"image_id": i, "sha256": h, "dummy": DUMMY} for i, h in hashes.items() if h]
        if rows:
            if not self.exists:
                self._create()
            self.client.upsert(self.name, rows)
        stale = [i for i in replaced if not hashes.get(i)]
        if stale:
            self.drop(stale)

    def drop(self, image_ids: list[str]) -> None:
        """Delete these photos' hashes (absent ones are no error)."""
        if self.exists and image_ids:
            self.client.delete(self.name, filter=f"image_id in [{', '.join(map(quote, image_ids))}]")

    def of_ids(self, image_ids: Iterable[str]) -> dict[str, str]:
        """id -> sha256 of those of these ids that have one."""
        ids = list(dict.fromkeys(image_ids))
        out: dict[str, str] = {}
        if not self.exists:
            return out
        for i in range(0, len(ids), LOOKUP_CHUNK):
            expr = "image_id in [" + ", ".join(map(quote, ids[i:i + LOOKUP_CHUNK])) + "]"
            for row in self.client.query(self.name, filter=expr, output_fields=["sha256"]):
                out[row["image_id"]] = row["sha256"]
        return out

    def ids_of(self, hashes: Iterable[str]) -> dict[str, list[str]]:
        """sha256 -> the ids (sorted) that hold those bytes, for those of these hashes held."""
        wanted = sorted({h for h in hashes if h})
        out: dict[str, list[str]] = {}
        if not self.exists:
            return out
        for i in range(0, len(wanted), LOOKUP_CHUNK):
            expr = "sha256 in [" + ", ".join(map(quote, wanted[i:i + LOOKUP_CHUNK])) + "]"
            for row in self.client.query(self.name, filter=expr, output_fields=["image_id", "sha256"]):
                out.setdefault(row["sha256"], []).append(row["image_id"])
        return {h: sorted(ids) for h, ids in out.items()}

    def count(self) -> int:
        if not self.exists:
            return 0
        rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0
