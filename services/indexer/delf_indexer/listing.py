"""The indexed images page by page, in id order (``delf.index.list``, ListImages).

A page is keyed by id: the images whose id sorts after ``after`` (the last id of the
previous page; "" for the first), the ``limit`` smallest of them. Neither Milvus Lite nor
a server returns a query's rows in primary-key order, so each page reads the ids after
``after`` (only that field, through the query iterator) and keeps the smallest: a page
costs a scan of the ids that follow it, and a listing that adds or deletes images
elsewhere in the order never repeats or skips one it has not reached. Python compares
strings by code point, the same order as Milvus' byte order of their UTF-8.

With a metadata filter the images collection's ``meta`` JSON field narrows the scan in
Milvus and ``metadata_matches`` decides exactly (the rule of search filters).
"""
from __future__ import annotations

import contextlib
import heapq

from delf_common.contract import check_filter, check_id_fits
from delf_indexer import rows
from delf_indexer.checks import metadata_matches, quote
from delf_indexer.schema import query_pages


def list_images(store, after: str = "", limit: int = 100, filter: dict | None = None) -> tuple[list[dict], str]:
    """(the infos of up to ``limit`` indexed images whose id sorts after ``after``, in id
    order and matching ``filter``; the id the next page starts after, "" when none follows)."""
    filter = check_filter(filter)
    if after:
        check_id_fits(after)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    with store._lock:
        if not store.exists:
            return [], ""
        ids = _first_ids_after(store, after, limit + 1, filter)
        found = store._image_rows(ids[:limit])
    # An image deleted between the two reads is left out; the next page starts after its id all the same.
    return [rows.stored_info(found[i]) for i in ids[:limit] if i in found], ids[limit - 1] if len(ids) > limit else ""


def _first_ids_after(store, after: str, count: int, filter: dict[str, str]) -> list[str]:
    """The ``count`` smallest ids after ``after`` of the images matching ``filter``, in order."""
    terms = [f"image_id > {quote(after)}" if after else 'image_id != ""']
    if filter and store._has_meta:
        terms += [f"meta[{quote(k)}] == {quote(v)}" for k, v in sorted(filter.items())]
    fields = ["image_id", "metadata"] if filter else ["image_id"]
    pages = query_pages(store.client, store.images_name, " and ".join(terms), fields)
    with contextlib.closing(pages):
        matching = (row["image_id"] for page in pages for row in page
                    if not filter or metadata_matches(row, filter))
        return heapq.nsmallest(count, matching)
