"""The descriptor index's settings: which vector index a deployment gets, and its knobs.

``IndexSettings.for_uri`` picks the index for a Milvus URI (a ``.db`` file: Milvus Lite,
``DELF_MILVUS_INDEX``, auto: IVF_SQ8; ``http://...``: a server, ``DELF_MILVUS_INDEX``); ``is_lite_uri`` tells the two
deployments apart. How the choices were measured: BENCHMARKS.md ("Milvus Lite index
choice", "Lite IVF lists", "Search latency against index size").

``IndexerSettings`` holds the rest of the indexer's settings, read once when a store is
built (``DescriptorStore.settings``); nothing on a request's path reads the environment.
"""
from __future__ import annotations

import dataclasses

from delf_common import config


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """Vector index of the descriptors: the per-deployment choice, in one place.

    What Milvus Lite 3.2 is: a pure-Python engine (Parquet segments of at most 100k rows,
    a WAL/memtable, tombstones) with one faiss index per segment. Index types it builds:
    BRUTE_FORCE/FLAT (numpy), HNSW and HNSW_SQ (faiss, param M/efConstruction, search ef),
    IVF_FLAT and IVF_SQ8 (faiss, nlist, search nprobe), AUTOINDEX (= HNSW); not IVF_PQ or
    DiskANN. It reports squared L2 like a server. Its search API does per-row Python work
    on every call (a validity mask over every row of every segment, a dict per hit, gRPC
    to pymilvus and back), which grows with the index. Hence the indexer's direct path for
    Lite (``delf_indexer.lite.LiteFastPath.knn``): the same segments, tombstones and
    filters searched through their faiss indexes with numpy masks, ``direct_nprobe`` lists
    per large segment (BENCHMARKS.md, "Lite IVF lists").

    Milvus Lite 3.x through its search API (BENCHMARKS.md, "Milvus Lite index choice"):
      * FLAT / BRUTE_FORCE: Lite computes distances with a (queries x rows x dim)
        numpy broadcast, which runs out of memory beyond toy sizes.
      * HNSW (faiss): fast searches, but a slow build of every 100k-row segment, and
        Lite rebuilds the index of every segment it compacts (segments grow to 100k
        rows) in a background thread.
      * IVF_FLAT: builds in a fraction of HNSW's time. Lite clamps nlist to the
        segment's rows; the API path probes a quarter of the lists, so small, freshly
        flushed segments stay accurate there; the direct path scans small segments
        exactly. -> chosen for Lite; IVF_SQ8 (the same lists, 8-bit codes) holds a row
        in less memory (BENCHMARKS.md "Scale in photos").
      The time per call is dominated by Lite's per-hit Python work, not the ANN, and
      falls with the queries per call, so queries go in batches of 500.
    Milvus server (C++ knowhere, proper growing-segment handling): chosen per deployment
    with DELF_MILVUS_INDEX (``SERVER_INDEXES``). auto = HNSW, the usual best recall/latency
    trade-off while the vectors fit in RAM; IVF_FLAT builds in a fraction of HNSW's
    time (bulk loads); IVF_SQ8 / IVF_PQ compress the vectors 4x / 16x for hundreds of
    millions of descriptors (the paper used PQ with an inverted file); DISKANN keeps them
    on SSD. DELF_MILVUS_SEARCH_PARAMS tunes recall against time.
    """

    index_type: str
    build_params: dict
    search_params: dict
    query_batch: int  # query vectors per search call
    # Milvus servers and Milvus Lite 3.x report squared L2 distances (Lite 2.x reported
    # the plain distance); the ratio test is defined on plain Euclidean distances.
    squared_l2: bool = True
    # IVF lists probed per Lite segment by the indexer's direct search (segments larger
    # than lite.EXACT_SEGMENT_ROWS; smaller ones are scanned exactly); see BENCHMARKS.md.
    direct_nprobe: int = config.SETTINGS["DELF_LITE_NPROBE"].default

    @classmethod
    def for_uri(cls, uri: str, index_type: str | None = None,
                search_params: dict | None = None) -> "IndexSettings":
        """The index for a deployment: Lite -> ``for_lite``; a server -> DELF_MILVUS_INDEX
        (auto: HNSW) with DELF_MILVUS_SEARCH_PARAMS over that type's defaults."""
        if is_lite_uri(uri):
            return cls.for_lite(index_type)
        index_type = index_type or config.get("DELF_MILVUS_INDEX")
        index_type = "HNSW" if index_type == "auto" else index_type
        if index_type not in SERVER_INDEXES:
            raise ValueError(f"unknown Milvus index type {index_type!r}; one of {', '.join(SERVER_INDEXES)}")
        build, search = SERVER_INDEXES[index_type]
        extra = config.get("DELF_MILVUS_SEARCH_PARAMS") if search_params is None else search_params
        # Build parameters only matter for a collection about to be created; an adopted
        # one (search_params given) is searched with its type's defaults.
        build_extra = config.get("DELF_MILVUS_INDEX_PARAMS") if search_params is None else {}
        return cls(index_type, {**build, **(build_extra or {})}, {**search, **(extra or {})},
                   query_batch=500)

    @classmethod
    def for_lite(cls, index_type: str | None = None) -> "IndexSettings":
        """Milvus Lite: DELF_MILVUS_INDEX (auto: IVF_SQ8) or `index_type` (an existing
        collection's), an IVF index that the indexer's direct search reads; the other types
        are a server's and are refused."""
        index_type = index_type or config.get("DELF_MILVUS_INDEX")
        index_type = LITE_DEFAULT_INDEX if index_type == "auto" else index_type
        if index_type not in LITE_INDEXES:
            raise ValueError(
                f"DELF_MILVUS_INDEX={index_type} is for a Milvus server; Milvus Lite (a .db file) "
                f"takes {' or '.join(LITE_INDEXES)} (auto: {LITE_DEFAULT_INDEX}), which the indexer's "
                f"direct search reads. Change it or point DELF_MILVUS_URI at a server")
        nlist = int(config.get("DELF_LITE_NLIST"))
        # The API path (DELF_LITE_DIRECT_SEARCH=0) probes a quarter of a segment's lists.
        return cls(index_type, {"nlist": nlist}, {"nprobe": max(1, nlist // 4)}, query_batch=500,
                   direct_nprobe=int(config.get("DELF_LITE_NPROBE")))

    def build_params_for(self, dim: int) -> dict:
        """Build parameters for `dim`-d vectors (IVF_PQ: sub-vectors of 4 dimensions
        where dim allows, else 2, else 1)."""
        params = dict(self.build_params)
        if self.index_type == "IVF_PQ" and not params.get("m"):
            sub = next(d for d in (4, 2, 1) if dim % d == 0)
            params["m"] = dim // sub
        return params


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


# Milvus Lite's IVF index types (faiss IndexIVF underneath, which the direct search reads).
LITE_INDEXES = ("IVF_SQ8", "IVF_FLAT")
LITE_DEFAULT_INDEX = "IVF_SQ8"  # BENCHMARKS.md, "Scale in photos"


def is_lite_uri(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


@dataclasses.dataclass(frozen=True)
class IndexerSettings:
    """The indexer's settings, read from the environment once: when a `DescriptorStore` is
    built (the worker's, in ``delf_indexer.tasks.get_store``), which keeps them as
    ``store.settings``. A search's own shortlist, neighbours and ratio, when given, override
    the ones here."""

    milvus_uri: str  # DELF_MILVUS_URI, else the Lite file under DELF_DATA_DIR
    milvus_token: str
    collection: str
    stored_features: int
    lite_direct_insert: bool
    lite_direct_search: bool
    lite_train_points: int
    shortlist: int
    neighbours: int
    ratio: float
    query_features: int
    filter_max_images: int
    skip_duplicates: bool = False  # DELF_DUPLICATES=skip

    @classmethod
    def from_env(cls) -> "IndexerSettings":
        return cls(
            milvus_uri=config.milvus_uri(),
            milvus_token=config.get("DELF_MILVUS_TOKEN"),
            collection=config.get("DELF_COLLECTION"),
            stored_features=int(config.get("DELF_STORED_FEATURES")),
            lite_direct_insert=bool(config.get("DELF_LITE_DIRECT_INSERT")),
            lite_direct_search=bool(config.get("DELF_LITE_DIRECT_SEARCH")),
            lite_train_points=int(config.get("DELF_LITE_TRAIN_POINTS")),
            shortlist=int(config.get("DELF_SHORTLIST")),
            neighbours=int(config.get("DELF_NEIGHBOURS")),
            ratio=float(config.get("DELF_RATIO")),
            query_features=int(config.get("DELF_QUERY_FEATURES")),
            filter_max_images=int(config.get("DELF_FILTER_MAX_IMAGES")),
            skip_duplicates=config.get("DELF_DUPLICATES") == "skip",
        )
