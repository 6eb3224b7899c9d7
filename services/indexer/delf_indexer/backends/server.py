"""A Milvus server (``DELF_MILVUS_URI=http://host:19530``, + ``DELF_MILVUS_TOKEN``) through pymilvus.

Any number of indexer workers may share it; it indexes growing segments itself, so a
write is searchable at once (strong consistency) and there is nothing to flush or wait
for. Every call is pymilvus' public API (``delf_indexer.schema``).
"""
from __future__ import annotations

import numpy as np

from delf_indexer import schema
from delf_indexer.backends.base import Hits, WarmUp, adopted_index
from delf_indexer.filters import SearchScope
from delf_indexer.rows import NewImage
from delf_indexer.settings import IndexerSettings, IndexRequest, IndexSettings

SCHEMES = ("http://", "https://", "tcp://", "unix:")

# Server index types: (build parameters, search parameters), chosen for 40-d DELF descriptors
# with 11 neighbours per query descriptor (21 since 2026-11-30; ef 64 still covers them).
# HNSW: M 16 / ef 64 gave the same landmarks-dev mAP as Lite's IVF (BENCHMARKS.md); IVF_*:
# 1024 lists per segment (a server segment holds about 2M of these rows), 16 probed;
# DISKANN: Milvus' defaults, search list 100.
SERVER_INDEXES: dict[str, tuple[dict, dict]] = {
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 64}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 16}),
    "IVF_SQ8": ({"nlist": 1024}, {"nprobe": 16}),
    "IVF_PQ": ({"nlist": 1024, "m": 0, "nbits": 8}, {"nprobe": 16}),
    "DISKANN": ({}, {"search_list": 100}),
}


class ServerBackend:
    """The descriptors of one index in a Milvus server."""

    kind = "server"
    index_types = tuple(SERVER_INDEXES)
    sole_writer = False  # other workers write too: nothing read is kept

    def __init__(self, uri: str, *, token: str, settings: IndexerSettings, features_name: str,
                 lock, index: IndexSettings | None = None, warm: WarmUp | None = None):
        from pymilvus import MilvusClient

        self.uri = uri
        self.features_name = features_name
        self.index = index or self.index_settings()
        self.client = MilvusClient(uri=uri, token=token or "")

    @classmethod
    def claims(cls, uri: str) -> bool:
        return uri.startswith(SCHEMES)

    @classmethod
    def index_settings(cls, index_type: str | None = None,
                       search_params: dict | None = None) -> IndexSettings:
        """DELF_MILVUS_INDEX (auto: HNSW) or ``index_type``, with DELF_MILVUS_SEARCH_PARAMS
        (or ``search_params``) over that type's defaults."""
        index_type = index_type or IndexRequest.index_type()
        index_type = "HNSW" if index_type == "auto" else index_type
        if index_type not in SERVER_INDEXES:
            raise ValueError(f"unknown Milvus index type {index_type!r}; one of {', '.join(SERVER_INDEXES)}")
        build, search = SERVER_INDEXES[index_type]
        extra = IndexRequest.search_params() if search_params is None else search_params
        # Build parameters only matter for a collection about to be created; an adopted
        # one (search_params given) is searched with its type's defaults.
        build_extra = IndexRequest.build_params() if search_params is None else {}
        return IndexSettings(index_type, {**build, **(build_extra or {})}, {**search, **(extra or {})},
                             query_batch=500)

    # ------------------------------------------------------------ collections
    def open_collection(self, adopt_index: bool) -> int:
        dim = schema.vector_dim(self.client, self.features_name)
        if adopt_index:
            self.index = adopted_index(self, self.features_name)
        self.client.load_collection(self.features_name)
        return dim

    def create_collections(self, images_name: str, dim: int) -> None:
        schema.create_collections(self.client, self.features_name, images_name, dim, self.index,
                                  self.index.build_params_for(dim))

    # ------------------------------------------------------------ rows
    def insert(self, images: list[NewImage], generations: list[int]) -> None:
        schema.api_insert(self.client, self.features_name, images, generations)

    def wrote(self, rows: int = 0) -> None:
        pass

    def knn(self, q: np.ndarray, k: int, scope: SearchScope) -> Hits:
        return schema.api_knn(self.client, self.features_name, self.index, q, k, scope.expr)

    def image_rows(self, image_id: str, generation: int, dim: int) -> dict[str, np.ndarray]:
        return schema.api_rows(self.client, self.features_name, image_id, generation)

    # ------------------------------------------------------------ upkeep: the server's own
    def settle_for_read(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def batch_done(self) -> None:
        pass

    def close(self, collections: list[str]) -> None:
        self.client.close()
        self.client = None
