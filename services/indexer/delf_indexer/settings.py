"""The descriptor index's settings: which vector index a deployment gets, and its knobs.

``IndexSettings`` is the vector index; each storage backend makes its own
(``delf_indexer.backends``: ``index_for(uri)``; a ``.db`` file: Milvus Lite,
``DELF_MILVUS_INDEX``, auto: IVF_SQ8; ``http://...``: a server, ``DELF_MILVUS_INDEX``, auto: HNSW).
How the choices were measured: BENCHMARKS.md ("Milvus Lite index choice", "Lite IVF lists",
"Search latency against index size").

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
    Lite (``delf_indexer.backends.lite_fast.LiteFastPath.knn``): the same segments, tombstones and
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
    with DELF_MILVUS_INDEX (``delf_indexer.backends.server.SERVER_INDEXES``). auto = HNSW, the usual best recall/latency
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
    # than lite_fast.EXACT_SEGMENT_ROWS; smaller ones are scanned exactly); a small
    # collection probes more (lite_fast.segment_probes); see BENCHMARKS.md.
    direct_nprobe: int = config.SETTINGS["DELF_LITE_NPROBE"].default

    def build_params_for(self, dim: int) -> dict:
        """Build parameters for `dim`-d vectors (IVF_PQ: sub-vectors of 4 dimensions
        where dim allows, else 2, else 1)."""
        params = dict(self.build_params)
        if self.index_type == "IVF_PQ" and not params.get("m"):
            sub = next(d for d in (4, 2, 1) if dim % d == 0)
            params["m"] = dim // sub
        return params


class IndexRequest:
    """What the environment asks of a new collection's vector index, read when a backend
    makes its ``IndexSettings`` (``index_settings``; each reads only the knobs it uses)."""

    @staticmethod
    def index_type() -> str:
        return config.get("DELF_MILVUS_INDEX")  # "auto": the backend's own choice

    @staticmethod
    def search_params() -> dict:
        return config.get("DELF_MILVUS_SEARCH_PARAMS")  # a server's

    @staticmethod
    def build_params() -> dict:
        return config.get("DELF_MILVUS_INDEX_PARAMS")  # a server's

    @staticmethod
    def lite_nlist() -> int:
        return int(config.get("DELF_LITE_NLIST"))

    @staticmethod
    def lite_nprobe() -> int:
        return int(config.get("DELF_LITE_NPROBE"))


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
