"""Metadata filters in a search: which photos match, and how a filter reaches the kNN.

A filter (``search(filter={key: value})``, exact equality on every pair, checked by
``contract.check_filter``) is resolved in two steps, so descriptor rows carry no metadata
(1000 rows per photo; a metadata change would rewrite them all): first the images
collection answers which photos match (``meta["key"] == "value"``, checked again in
Python), then

* a *selective* filter (at most ``DELF_FILTER_MAX_IMAGES`` photos) is pushed into the
  descriptor search as ``image_id in [...]``: the kNN runs among those photos' descriptors
  only, so the result is exactly the unfiltered algorithm over the matching subset;
* a *broad* filter (more photos than that) is applied after voting: the kNN runs over
  everything, votes for non-matching photos are dropped and the shortlist is filled from
  the matching ones. Neighbours of non-matching photos still take kNN slots, which is
  harmless when most photos match (the only way to exceed the limit in a large index
  is a filter that keeps a large share), and the expression stays small.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

from delf_indexer.checks import metadata_matches, quote
from delf_indexer.schema import QUERY_MAX_LIMIT, query_pages


@dataclasses.dataclass(frozen=True)
class SearchScope:
    """Which descriptors one search may reach: ``expr`` for the Milvus search API,
    ``deny``/``allow`` (image ids; allow None: any) for the Lite fast path, and
    ``post_filter`` when a broad metadata filter is applied after voting instead."""

    expr: str
    deny: set
    allow: set | None
    post_filter: bool


def search_scope(filter: dict[str, str], exclude: list[str],
                 matching: Callable[[int], list[str]], max_images: int) -> SearchScope | None:
    """The scope of a search that leaves out ``exclude`` and keeps ``filter`` (a checked
    filter, {} for none); ``matching(limit)``: up to ``limit`` ids of the photos the filter
    matches; ``max_images`` (DELF_FILTER_MAX_IMAGES): most matching photos that restrict the
    kNN itself. None when the filter leaves no photo."""
    expr = ("image_id not in [" + ", ".join(quote(x) for x in exclude) + "]") if exclude else ""
    if not filter:
        return SearchScope(expr, set(exclude), None, False)
    max_ids = max(1, max_images)
    left_out = set(exclude)
    allowed = [i for i in matching(max_ids + 1 + len(left_out)) if i not in left_out]
    if not allowed:
        return None
    if len(allowed) <= max_ids:
        expr = "image_id in [" + ", ".join(quote(x) for x in allowed) + "]"
        return SearchScope(expr, set(exclude), set(allowed), False)
    return SearchScope(expr, set(exclude), None, True)


def matching_images(client, images_name: str, has_meta: bool, filter: dict[str, str],
                    limit: int | None) -> list[str]:
    """Ids of the photos in the images collection whose metadata holds every pair of a
    checked ``filter``, at most ``limit``. ``has_meta``: the collection has the ``meta``
    JSON field."""
    # The JSON-field expression narrows the scan in Milvus; the exact check in Python
    # is the rule (and the whole filter on a collection created without `meta`).
    if has_meta and filter:
        expr = " and ".join(f"meta[{quote(k)}] == {quote(v)}" for k, v in sorted(filter.items()))
    else:
        expr = 'image_id != ""'
    out: list[str] = []
    if has_meta and filter and limit is not None and limit <= QUERY_MAX_LIMIT:
        # one call (no iterator) when the answer fits a page: the usual case in search
        rows = client.query(images_name, filter=expr, limit=limit,
                            output_fields=["image_id", "metadata"])
        if len(rows) < limit:  # all JSON matches seen: the exact check decides
            return [r["image_id"] for r in rows if metadata_matches(r, filter)]
    pages = query_pages(client, images_name, expr, ["image_id", "metadata"])
    with contextlib.closing(pages):
        for page in pages:
            for row in page:
                if metadata_matches(row, filter):
                    out.append(row["image_id"])
                    if limit is not None and len(out) >= limit:
                        return out
    return out
