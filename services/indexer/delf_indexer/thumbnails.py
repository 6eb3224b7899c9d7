"""The indexed photos' thumbnails: a third collection beside the descriptors and images.

``<name>_thumbnails`` (``DELF_COLLECTION`` = ``<name>``) holds one row per photo that came
with a thumbnail: ``image_id`` (pk), ``jpeg`` (the JPEG, base64 text: Milvus has no bytes
field; a VARCHAR of at most 65,535 bytes, which the extractor's bound of
``delf_common.images.THUMBNAIL_MAX_BYTES`` keeps it under) and a 2-d dummy vector (Milvus
wants a vector field in every collection). It lives in the same Milvus as the rest, Lite
file or server, so it survives restarts and is shared by every indexer worker.

The store writes a photo's thumbnail before its images row (an upsert: a re-added id gets
the new one; a re-add without a thumbnail drops the old one) and deletes it with the photo.
An index created before thumbnails existed gets the collection on its first add.
"""
from __future__ import annotations

import base64
import logging
from typing import Iterable

from delf_indexer.checks import quote
from delf_indexer.side_collections import DUMMY, KeyedCollection

log = logging.getLogger(__name__)

JPEG_FIELD_LENGTH = 65535


class ThumbnailStore(KeyedCollection):
    """The thumbnails collection of one index (``client``: the store's MilvusClient)."""

    field = "jpeg"
    max_length = JPEG_FIELD_LENGTH

    def write(self, thumbnails: dict[str, bytes], replaced: Iterable[str] = ()) -> None:
        """Store these photos' thumbnails (replacing any), and drop the old thumbnail of
        each ``replaced`` id that comes without one now."""
        rows = []
        for image_id, jpeg in thumbnails.items():
            text = base64.b64encode(jpeg).decode("ascii")
            if len(text) > JPEG_FIELD_LENGTH:
                raise ValueError(f"the thumbnail of {image_id!r} is {len(jpeg):,} bytes; at most "
                                 f"{JPEG_FIELD_LENGTH * 3 // 4:,} can be stored")
            rows.append({"image_id": image_id, "jpeg": text, "dummy": DUMMY})
        if rows:
            if not self.exists:
                self._create()
            self.client.upsert(self.name, rows)
        stale = [i for i in replaced if i not in thumbnails]
        if stale:
            self.drop(stale)

    def drop(self, image_ids: list[str]) -> None:
        """Delete these photos' thumbnails (absent ones are no error)."""
        if self.exists and image_ids:
            self.client.delete(self.name, filter=f"image_id in [{', '.join(map(quote, image_ids))}]")

    def get(self, image_id: str) -> bytes:
        """The photo's thumbnail JPEG; b"" when none is stored."""
        if not self.exists:
            return b""
        rows = self.client.query(self.name, filter=f"image_id == {quote(image_id)}",
                                 output_fields=["jpeg"], limit=1)
        return base64.b64decode(rows[0]["jpeg"]) if rows else b""

    def count(self) -> int:
        if not self.exists:
            return 0
        rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0
