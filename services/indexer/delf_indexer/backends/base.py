"""What the descriptor store asks of the Milvus it keeps its rows in: the ``StorageBackend``.

A backend owns the pymilvus ``MilvusClient`` and everything that differs between
deployments: how the descriptors collection is created and its vector index chosen, how
descriptor rows are written and read back, how a kNN of a batch of query vectors runs, and
when new rows become searchable (flushes, index builds). The store (``delf_indexer.store``)
keeps the rules (generations, checks, voting, thumbnails, duplicates, listing) and asks the
client's common API (query, upsert, delete) for the images and side collections, which
every backend answers alike.

One class per backend, registered by kind in ``delf_indexer.backends.BACKENDS``;
``backend_for(uri)`` picks one once, when the store opens.
"""
from __future__ import annotations

import logging
from typing import Callable, ClassVar, Protocol, runtime_checkable

import numpy as np

from delf_indexer.filters import SearchScope
from delf_indexer.rows import NewImage
from delf_indexer.settings import IndexSettings

log = logging.getLogger(__name__)

# Per query row: (distances, image ids, x, y, scale) of its nearest descriptors, nearest first.
Hits = list[tuple[list, list, list, list, list]]
WarmUp = Callable[[], object]  # what a backend runs once new rows became searchable in the background


@runtime_checkable
class StorageBackend(Protocol):
    """One Milvus deployment holding one index's descriptors collection (``features_name``).

    Built as ``cls(uri, token=..., settings=..., features_name=..., lock=..., index=...,
    warm=...)``: ``lock`` is the store's (a backend's background work takes it), ``index``
    the vector index to use (None: ``index_settings()``), ``warm`` what to run after new rows
    became searchable in the background (the store's probe search)."""

    kind: ClassVar[str]  # its name in the registry
    index_types: ClassVar[tuple[str, ...]]  # the vector index types it builds and searches
    sole_writer: ClassVar[bool]  # only this process writes: what the store read stays true until it writes
    uri: str
    client: object  # pymilvus.MilvusClient; None once closed
    index: IndexSettings

    @classmethod
    def claims(cls, uri: str) -> bool:
        """Whether ``uri`` (DELF_MILVUS_URI, or the Lite file's path) names this backend."""

    @classmethod
    def index_settings(cls, index_type: str | None = None,
                       search_params: dict | None = None) -> IndexSettings:
        """The vector index of a new collection (DELF_MILVUS_INDEX, or ``index_type``: an
        existing collection's, searched with ``search_params`` over its type's defaults when
        given); ValueError for a type this backend does not build."""

    def open_collection(self, adopt_index: bool) -> int:
        """Load the existing descriptors collection; its vectors' dimension. With
        ``adopt_index``, search it with the index it was built with (``adopted_index``)."""

    def create_collections(self, images_name: str, dim: int) -> None:
        """Create and load the descriptors collection (``dim``-d, ``index``) and the images one."""

    def insert(self, images: list[NewImage], generations: list[int]) -> None:
        """Write the images' descriptor rows, each image under its generation."""

    def wrote(self, rows: int = 0) -> None:
        """The store wrote (``rows`` new descriptor rows; 0: a delete)."""

    def knn(self, q: np.ndarray, k: int, scope: SearchScope) -> Hits:
        """Per query row, its ``k`` nearest descriptors among the images in ``scope``."""

    def image_rows(self, image_id: str, generation: int, dim: int) -> dict[str, np.ndarray]:
        """One image's descriptor rows of one generation: {idx, x, y, scale, score, desc} arrays."""

    def settle_for_read(self) -> None:
        """Before a search: make the writes so far visible to ``knn`` (as cheaply as it can)."""

    def settle(self) -> None:
        """Make every write so far searchable through the vector index, however long that takes."""

    def batch_done(self) -> None:
        """A batch of writes ended (an ingest job completed)."""

    def close(self, collections: list[str]) -> None:
        """Persist ``collections`` where needed, close the client and free what it held."""


def adopted_index(backend: StorageBackend, features_name: str) -> IndexSettings:
    """A collection keeps the index it was created with: the index settings to search it
    with (that type's parameters), whatever DELF_MILVUS_INDEX says now."""
    current = backend.index
    try:
        found = str(backend.client.describe_index(features_name, "desc").get("index_type", ""))
    except Exception:  # pragma: no cover - an index-less collection or an older server
        log.warning("could not read the index of %s", features_name, exc_info=True)
        return current
    if found and found != current.index_type and found in backend.index_types:
        log.warning("%s was created with a %s index; the settings ask for %s, which only "
                    "applies to a new collection. Searching it as %s.", features_name,
                    found, current.index_type, found)
        return type(backend).index_settings(found, search_params={})
    return current
