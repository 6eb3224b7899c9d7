"""Milvus Lite (the default): ``DELF_MILVUS_URI`` empty -> the file ``$DELF_DATA_DIR/milvus.db``.

Lite runs *inside the worker process* (a gRPC server on a thread), so only one process
may open a file: run the indexer as ``celery -A delf_indexer.tasks worker -Q <prefix>.index
--pool solo`` (``--pool threads`` also works: the store serialises its calls with a lock).
Being the only writer, the store may keep what it read until it writes (``sole_writer``).

Lite keeps new rows in a memtable until a flush writes them as a segment, then builds that
segment's index in a background thread. On the Lite versions ``lite_version`` lists, the
fast paths (``lite_fast.LiteFastPath``: direct inserts, kNN and row reads of Lite's
segments; ``lite_patches``: a faster flush, a sampled k-means) replace its public API where
they can (``DELF_LITE_DIRECT_INSERT``, ``DELF_LITE_DIRECT_SEARCH``) and new rows are
flushed in the background (``delf_indexer.settling``); on any other version, its public
API, the same answers, and one warning.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from delf_indexer import rows, schema
from delf_indexer.backends.base import Hits, WarmUp, adopted_index
from delf_indexer.backends.lite_fast import LiteFastPath, release_server
from delf_indexer.backends.lite_patches import quiet_alloc_timestamp, sample_training, speed_up_flush
from delf_indexer.filters import SearchScope
from delf_indexer.settings import IndexerSettings, IndexRequest, IndexSettings
from delf_indexer.settling import IdleFlush

log = logging.getLogger(__name__)

# Milvus Lite's IVF index types (faiss IndexIVF underneath, which the direct search reads).
LITE_INDEXES = ("IVF_SQ8", "IVF_FLAT")
LITE_DEFAULT_INDEX = "IVF_SQ8"  # BENCHMARKS.md, "Scale in photos"
READ_WAIT_S = 600  # without the direct search, the longest a read waits for Lite's index build


class LiteBackend:
    """The descriptors of one index in a Milvus Lite file, in this process."""

    kind = "lite"
    index_types = LITE_INDEXES
    sole_writer = True  # one process per file

    def __init__(self, uri: str, *, token: str, settings: IndexerSettings, features_name: str,
                 lock, index: IndexSettings | None = None, warm: WarmUp | None = None):
        from pymilvus import MilvusClient

        self.uri = os.path.abspath(uri)
        if not self.uri.endswith(".db"):
            raise ValueError(f"a Milvus Lite URI must be a file path ending in .db, got {self.uri!r}")
        os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        self.features_name = features_name
        self.settings = s = settings
        self.lock = lock  # the store's: a background flush takes it
        self.index = index or self.index_settings()
        self.fast = LiteFastPath.open(self.uri, features_name)  # None: an untested Lite version
        self.direct_insert = self.fast is not None and s.lite_direct_insert and speed_up_flush()
        if self.fast is not None:
            sample_training(s.lite_train_points)
        self.direct_rows = 0  # descriptor rows written by the direct path (tests, benchmarks)
        self.ready = False  # the descriptors collection exists
        self._dirty = True  # rows may sit in the memtable
        self.idle_flush = (IdleFlush(self.flush, after=warm)  # settling
                           if self.fast and s.lite_direct_search else None)
        # Before Lite's in-process server starts (it binds its servicer's methods then):
        # no harmless AllocTimestamp ERROR traceback per index build (lite_patches).
        quiet_alloc_timestamp()
        self.client = MilvusClient(uri=self.uri, token=token or "")

    @classmethod
    def claims(cls, uri: str) -> bool:
        return True  # a file path: what no other backend claims (the registry asks it last)

    @classmethod
    def index_settings(cls, index_type: str | None = None,
                       search_params: dict | None = None) -> IndexSettings:
        """DELF_MILVUS_INDEX (auto: IVF_SQ8) or `index_type` (an existing collection's), an
        IVF index that the indexer's direct search reads; the other types are a server's and
        are refused. ``search_params`` are not used: DELF_LITE_NLIST and DELF_LITE_NPROBE."""
        index_type = index_type or IndexRequest.index_type()
        index_type = LITE_DEFAULT_INDEX if index_type == "auto" else index_type
        if index_type not in LITE_INDEXES:
            raise ValueError(
                f"DELF_MILVUS_INDEX={index_type} is for a Milvus server; Milvus Lite (a .db file) "
                f"takes {' or '.join(LITE_INDEXES)} (auto: {LITE_DEFAULT_INDEX}), which the indexer's "
                f"direct search reads. Change it or point DELF_MILVUS_URI at a server")
        nlist = IndexRequest.lite_nlist()
        # The API path (DELF_LITE_DIRECT_SEARCH=0) probes a quarter of a segment's lists.
        return IndexSettings(index_type, {"nlist": nlist}, {"nprobe": max(1, nlist // 4)}, query_batch=500,
                             direct_nprobe=IndexRequest.lite_nprobe())

    # ------------------------------------------------------------ collections
    def open_collection(self, adopt_index: bool) -> int:
        dim = schema.vector_dim(self.client, self.features_name)
        if adopt_index:
            self.index = adopted_index(self, self.features_name)
        self.client.load_collection(self.features_name)
        self.ready = True
        return dim

    def create_collections(self, images_name: str, dim: int) -> None:
        # pymilvus 3 sends index parameters as flat key/values (a server reads those);
        # Milvus Lite 3.2 reads only a JSON "params" entry and silently builds its
        # default (nlist 128) otherwise.
        schema.create_collections(self.client, self.features_name, images_name, dim, self.index,
                                  {"params": self.index.build_params_for(dim)})
        self.ready = True

    # ------------------------------------------------------------ rows
    def insert(self, images: list[rows.NewImage], generations: list[int]) -> None:
        """Straight as columns into Lite's write-ahead log and memtable when its internals
        allow (``LiteFastPath.insert``), else through the API in batches."""
        if self.fast is not None and self.direct_insert:
            columns = rows.feature_columns(images, generations)
            if not columns or self.fast.insert(columns):
                self.direct_rows += len(columns.get("idx", ()))
                return
        schema.api_insert(self.client, self.features_name, images, generations)

    def wrote(self, rows: int = 0) -> None:
        self._dirty = True
        if self.idle_flush is not None:
            self.idle_flush.wrote(rows)

    def knn(self, q: np.ndarray, k: int, scope: SearchScope) -> Hits:
        """Lite's fast path where it answers (``DELF_LITE_DIRECT_SEARCH``), else the search API."""
        hits = None
        if self.settings.lite_direct_search:
            hits = self.direct_knn(q, k, deny=scope.deny, allow=scope.allow)
        if hits is None:
            hits = schema.api_knn(self.client, self.features_name, self.index, q, k, scope.expr)
        return hits

    def image_rows(self, image_id: str, generation: int, dim: int) -> dict[str, np.ndarray]:
        cols = None
        if self.settings.lite_direct_search:
            self.settle_for_read()
            cols = self.direct_rows_of(image_id, generation, dim)
        if cols is None:
            cols = schema.api_rows(self.client, self.features_name, image_id, generation)
        return cols

    def direct_knn(self, q: np.ndarray, k: int, deny: set, allow: set | None) -> Hits | None:
        """The API's kNN answer read straight from Lite's segments, or None to use the
        search API (``LiteFastPath.knn``; valid after ``settle_for_read``)."""
        if self.fast is None:
            return None
        return self.fast.knn(q, k, self.index.direct_nprobe, deny, allow)

    def direct_rows_of(self, image_id: str, generation: int, dim: int) -> dict | None:
        """One image's descriptor rows read straight from Lite's segments, or None to use
        the query API (``LiteFastPath.rows``; valid after ``settle_for_read``)."""
        if self.fast is None:
            return None
        return self.fast.rows(image_id, generation, dim)

    def snapshot(self):
        """(segments, tombstones) as Milvus Lite holds them now, or None (LiteFastPath.snapshot)."""
        return self.fast.snapshot() if self.fast is not None else None

    # ------------------------------------------------------------ upkeep
    def flush(self) -> None:
        """The memtable's rows to a segment (indexed by Lite in the background; ``settling``)."""
        with self.lock:
            if self.client is None or not self._dirty or not self.ready:
                return
            self.client.flush(self.features_name)
            self._dirty = False

    def settle_for_read(self) -> None:
        """Flush. The direct search reads an unindexed segment exactly: no wait for the build
        (``settling``); Lite's own search API would scan it by a broadcast of gigabytes, so
        without the direct path a read waits for it (at most ``READ_WAIT_S``)."""
        dirty = self._dirty
        self.flush()
        if dirty and self.idle_flush is None and self.fast is not None and self.ready:
            self.fast.wait_for_index(READ_WAIT_S)

    def settle(self) -> None:
        """Flush and wait for Lite's index build, however long it takes (bulk loads, benchmarks)."""
        self.flush()
        if self.fast is not None and self.ready:
            self.fast.wait_for_index(None)

    def batch_done(self) -> None:
        """An ingest job completed: flush in the background now (``settling``)."""
        if self.idle_flush is not None:
            self.idle_flush.now()

    def close(self, collections: list[str]) -> None:
        """Flush every collection, close the client and stop the in-process server, so its
        files are flushed and another store (or process) can open them."""
        if self.idle_flush is not None:
            self.idle_flush.close()
        for name in collections:
            try:
                if self.client.has_collection(name):
                    self.client.flush(name)
            except Exception:  # pragma: no cover - best effort
                log.exception("flush of %s failed", name)
        self.client.close()
        self.client = None
        release_server(self.uri)
