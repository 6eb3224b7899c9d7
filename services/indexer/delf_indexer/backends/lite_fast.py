"""The Milvus Lite fast path: direct reads and writes of Milvus Lite's private internals
(with ``lite_patches``, the only code that touches them; ``lite.LiteBackend`` uses it).

Milvus Lite (milvus-lite 3.2.x, pinned in pyproject.toml) runs inside the indexer process:
a pure-Python engine of immutable Parquet segments (one faiss index each), a memtable
and tombstones. Its public search and query APIs do per-row Python work over every row
of every segment on each call (a validity mask, a dict per hit, gRPC to pymilvus and back),
which grows with the index (BENCHMARKS.md, "Search latency against index size"). The
``LiteFastPath`` reads the same snapshot of segments and tombstones (taken under Lite's
lock) with numpy masks and the segments' own faiss indexes instead.

Everything here touches names Lite does not promise to keep (``server_manager_instance
._servers``, ``_memtable``, ``_read_snapshot``, the delta log's ``_map``, segment
``table``/``pks``/``seqs``/``indexes``/``vector_data``, ``_wait_for_bg``). So a Lite upgrade
touches this file and ``lite_patches`` only, and every method answers None (or does nothing) when the internals
are not as expected: the store then uses the public API, which gives the same answers. It
runs at all only on the Lite versions listed in `delf_indexer.backends.lite_version`.
"""
from __future__ import annotations

import logging

import numpy as np

from delf_indexer.backends.lite_version import lite_internals_allowed

log = logging.getLogger(__name__)

# Lite segments up to this many rows are searched exactly (BLAS) by the direct path: a
# freshly flushed segment of a few photos has few vectors per IVF list, so a small nprobe
# would miss most of them; an exact scan of 20k rows costs ~1 GFLOP per 1000 queries.
EXACT_SEGMENT_ROWS = 20_000

# Larger indexed segments are searched through their IVF lists: ``DELF_LITE_NPROBE`` of
# each segment's 1024, about 0.6% of a collection of any size. A small collection (a few
# segments of ~25k rows, ~25 rows a list) then scans only a few hundred rows per query
# descriptor, and which neighbours it finds, so its ranking, depends on how its rows were
# cut into segments. So every segment probes at least enough lists for the collection to
# scan about ``nprobe * ROWS_PER_PROBE`` rows per query descriptor (about four times what
# nprobe lists of one full ~300k segment hold): more lists below ~1M rows (~2,000 photos),
# the setting as it is above. A small collection then ranks as the exact search does (within
# ~0.006 mAP on landmarks-dev) for a few milliseconds of kNN (BENCHMARKS.md, "Approximate
# search in a small collection" and "Seven voting neighbours").
ROWS_PER_PROBE = 1024


def segment_probes(nprobe: int, nlist: int, collection_rows: int) -> int:
    """Lists to probe in one IVF segment of ``nlist`` lists, in a collection of
    ``collection_rows`` rows: ``nprobe``, or more in a small collection, so that it scans
    about ``nprobe * ROWS_PER_PROBE`` rows in all; never more than ``nlist``."""
    scan = -(-nprobe * ROWS_PER_PROBE * nlist // max(collection_rows, 1))  # ceil
    return max(1, min(nlist, max(nprobe, scan)))


# What a Lite internal that is not as expected raises (the fast path then declines).
_INTERNALS_DIFFER = (AttributeError, KeyError, TypeError)

ROW_FIELDS = ("idx", "x", "y", "scale", "score", "desc")


class LiteFastPath:
    """Direct reads of one Milvus Lite collection (the descriptors) in this process.

    ``knn`` and ``rows`` are valid only when nothing waits in Lite's memtable: flush the
    collection first (``LiteBackend.settle_for_read``); they answer None otherwise.
    """

    def __init__(self, uri: str, collection: str):
        self.uri = uri
        self.collection = collection
        self._seg_cols: dict = {}  # (segment file, rows) -> column arrays

    @classmethod
    def open(cls, uri: str, collection: str) -> "LiteFastPath | None":
        """The fast path, or None when the installed Lite is not a tested version
        (`delf_indexer.backends.lite_version`): the store then uses Lite's public API."""
        return cls(uri, collection) if lite_internals_allowed() else None

    # ------------------------------------------------------------ the Lite server
    def _engine(self):
        """Milvus Lite's in-process collection engine, or None."""
        try:
            from milvus_lite.server_manager import server_manager_instance

            entry = server_manager_instance._servers.get(self.uri)
            return entry[1].get_collection(self.collection) if entry is not None else None
        except Exception:  # noqa: BLE001 - depends on milvus-lite internals
            return None

    def wait_for_index(self, timeout: float | None = 600) -> bool:
        """Wait for Lite's background compaction and index build after a flush; True when
        it finished, False after `timeout` seconds (None: however long it takes, with a log
        line a minute) or when the internals are not as expected.

        Lite searches its memtable and any segment whose index is not built yet by a
        numpy broadcast (queries x rows x dim floats: gigabytes for a few hundred
        queries), and builds indexes in a background thread after a flush. Without
        this hook (other internals) the store only flushes.
        """
        import concurrent.futures
        import time

        try:
            from milvus_lite.server_manager import server_manager_instance

            entry = server_manager_instance._servers.get(self.uri)
            if entry is None:
                return False
            collection = entry[1].get_collection(self.collection)
            start = time.monotonic()
            while True:
                step = 60.0 if timeout is None else max(0.0, min(60.0, start + timeout - time.monotonic()))
                try:
                    collection._wait_for_bg(timeout=step)
                    return True
                except concurrent.futures.TimeoutError:
                    waited = time.monotonic() - start
                    if timeout is not None and waited >= timeout:
                        log.warning("Milvus Lite is still indexing after %.0f s; searches scan the "
                                    "segments it has not indexed yet exactly", waited)
                        return False
                    log.info("Milvus Lite is still indexing new segments (%.0f s so far)", waited)
        except Exception:  # pragma: no cover - depends on milvus-lite internals
            log.warning("could not wait for Milvus Lite's background index build", exc_info=True)
            return False

    def snapshot(self):
        """(segments, tombstones) of the collection as Milvus Lite holds them now, or None
        when the direct path cannot answer (no Lite engine, or rows still in its memtable).
        Raises AttributeError/KeyError/TypeError when Lite's internals differ."""
        col = self._engine()
        if col is None or col._memtable.size() != 0:
            return None
        segments, delta = col._read_snapshot()
        tomb = _tombstones(delta)
        return None if tomb is None else (segments, tomb)

    # ------------------------------------------------------------ writes
    def insert(self, columns: dict[str, np.ndarray]) -> bool:
        """Append descriptor rows, given as one array per field (the vector field as an
        (n, dim) float32 array), straight to Lite's write-ahead log and memtable: what its
        public insert does after building a dict per row, checking each one and building
        the same Arrow batch back from them (most of an insert's time). The caller has
        checked the values (``rows.prepare``, the store's dimension check). Answers False,
        having written nothing, when Lite's internals are not as expected: use the API."""
        col = self._engine()
        if col is None:
            return False
        try:
            batch = _wal_batch(col, columns)
            if batch is None:
                return False
            from milvus_lite.engine.operation import InsertOp
        except _INTERNALS_DIFFER + (ImportError, ValueError):
            log.warning("Milvus Lite's insert internals differ; using its API", exc_info=True)
            return False
        n = batch.num_rows
        col._next_auto_id += n
        col._next_seq += n
        col._apply(InsertOp(partition=_PARTITION, batch=batch))
        if col._should_flush():
            col._trigger_flush()
        return True

    # ------------------------------------------------------------ reads
    def rows(self, image_id: str, generation: int, dim: int) -> dict | None:
        """One image's descriptor rows of one generation ({idx, x, y, scale, score, desc}
        arrays, in segment order), read straight from the segments: a filtered query
        scans every row in Python. None: use the query API."""
        try:
            import pyarrow as pa

            snapshot = self.snapshot()
            if snapshot is None:
                return None
            segments, tomb = snapshot
            parts: dict[str, list] = {k: [] for k in ROW_FIELDS}
            for seg in segments:
                if seg.num_rows == 0:
                    continue
                cols = self._segment_columns(seg)
                code = np.flatnonzero(cols["names"] == image_id)
                if len(code) == 0:
                    continue
                rows = np.flatnonzero((cols["code"] == code[0]) & ~_deleted(cols, tomb))
                if len(rows) == 0:
                    continue
                gen = seg.table.column("generation").take(pa.array(rows)).to_numpy()
                rows = rows[gen == generation]
                take = pa.array(rows)
                for name in ("idx", "scale", "score"):
                    parts[name].append(seg.table.column(name).take(take).to_numpy())
                parts["x"].append(cols["x"][rows])
                parts["y"].append(cols["y"][rows])
                vectors, _ = seg.vector_data("desc")
                parts["desc"].append(np.asarray(vectors[rows], np.float32))
            if not parts["idx"]:
                return {k: np.zeros((0, dim) if k == "desc" else 0, np.float32) for k in parts}
            return {k: np.concatenate(v) for k, v in parts.items()}
        except _INTERNALS_DIFFER as exc:  # pragma: no cover - other internals
            log.warning("Milvus Lite direct read unavailable (%s); using the query API", exc)
            return None

    def knn(self, q: np.ndarray, k: int, nprobe: int, deny: set, allow: set | None):
        """The k nearest descriptors of each query row, or None to use the search API.

        Per query row: (distances, image ids, x, y, scale) lists, nearest first, plain
        (not squared) L2 - what ``schema.api_knn`` answers. Rows deleted by a
        later tombstone or of denied / non-allowed images are left out through a faiss
        IDSelectorBitmap. Segments over ``EXACT_SEGMENT_ROWS`` rows with an IVF index are
        searched through it (``segment_probes`` lists); smaller ones (or not yet indexed)
        exactly.
        """
        try:
            snapshot = self.snapshot()
            if snapshot is None:
                return None
            segments, tomb = snapshot
            live = {(seg.file_path, seg.num_rows) for seg in segments}
            for key in [key for key in self._seg_cols if key not in live]:
                del self._seg_cols[key]
            parts_d, parts_i, tables = [], [], []
            rows = sum(seg.num_rows for seg in segments)  # the collection's, for segment_probes
            for seg in segments:
                if seg.num_rows == 0:
                    continue
                cols = self._segment_columns(seg)
                valid = ~_deleted(cols, tomb)
                if deny or allow is not None:
                    ok = np.array([(allow is None or n in allow) and n not in deny
                                   for n in cols["names"]], bool)
                    valid &= ok[cols["code"]]
                if not valid.any():
                    continue
                d, i = _search_segment(seg, q, k, nprobe, valid, rows)
                parts_d.append(d)
                parts_i.append(np.where(i >= 0, i + (len(tables) << 32), -1))
                tables.append(cols)
            if not tables:
                return [([], [], [], [], []) for _ in range(len(q))]
            return _merge(parts_d, parts_i, tables, k)
        except _INTERNALS_DIFFER as exc:  # pragma: no cover - other internals
            log.warning("Milvus Lite direct search unavailable (%s); using the search API", exc)
            return None

    def _segment_columns(self, seg) -> dict:
        """Per Lite segment (immutable Parquet file): pks, delete seqs, image names per row
        (dictionary codes), x, y, scale as arrays; cached while the segment lives."""
        key = (seg.file_path, seg.num_rows)
        cols = self._seg_cols.get(key)
        if cols is None:
            enc = seg.table.column("image_id").combine_chunks().dictionary_encode()
            cols = {
                "pk": np.asarray(seg.pks, np.int64),
                "seq": np.asarray(seg.seqs, np.int64),
                "code": enc.indices.to_numpy(zero_copy_only=False).astype(np.int32),
                "names": np.array(enc.dictionary.to_pylist(), dtype=object),
                "x": seg.table.column("x").to_numpy().astype(np.float32),
                "y": seg.table.column("y").to_numpy().astype(np.float32),
                "scale": seg.table.column("scale").to_numpy().astype(np.float32),
            }
            self._seg_cols[key] = cols
        return cols


def release_server(uri: str) -> None:
    """Stop the in-process Lite server of this file (after the client closed), so its
    files are flushed and another store (or process) can open them. On every Lite version
    (a store must free its file): a Lite without this internal keeps its server running."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except (ImportError, *_INTERNALS_DIFFER):  # pragma: no cover - depends on milvus-lite internals
        log.warning("could not stop Milvus Lite's server of %s", uri, exc_info=True)


def _tombstones(delta):
    """Lite's tombstones (pk -> delete seq) as sorted arrays; None if unreadable."""
    tomb = getattr(delta, "_map", None)
    if tomb is None:
        return None
    if not tomb:
        return ()
    t_pk = np.fromiter(tomb.keys(), np.int64, len(tomb))
    t_seq = np.fromiter(tomb.values(), np.int64, len(tomb))
    order = np.argsort(t_pk)
    return t_pk[order], t_seq[order]


def _deleted(cols: dict, tomb) -> np.ndarray:
    """Rows of a segment shadowed by a later tombstone."""
    if not tomb:
        return np.zeros(len(cols["pk"]), bool)
    t_pk, t_seq = tomb
    pos = np.minimum(np.searchsorted(t_pk, cols["pk"]), len(t_pk) - 1)
    return (t_pk[pos] == cols["pk"]) & (t_seq[pos] > cols["seq"])


def _search_segment(seg, q: np.ndarray, k: int, nprobe: int, valid: np.ndarray, collection_rows: int):
    """(squared distances (nq, k'), segment rows (nq, k')) of the k nearest valid rows of
    one segment; missing hits have row -1 and distance inf."""
    import faiss

    n_valid = int(valid.sum())
    kk = min(k, n_valid)
    index = seg.indexes.get("desc")
    fi = getattr(index, "_index", None)
    if (fi is not None and isinstance(fi, faiss.IndexIVF) and fi.ntotal == seg.num_rows
            and seg.num_rows > EXACT_SEGMENT_ROWS):
        params = faiss.SearchParametersIVF()
        params.nprobe = segment_probes(nprobe, fi.nlist, collection_rows)
        if n_valid < seg.num_rows:
            bits = np.packbits(valid, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(seg.num_rows, faiss.swig_ptr(bits))
        d, i = fi.search(q, kk, params=params)
    else:  # a small segment (or one without an IVF index yet): exact
        rows = np.flatnonzero(valid)
        vectors, _ = seg.vector_data("desc")
        d, i = faiss.knn(q, np.ascontiguousarray(vectors[rows], np.float32), kk)
        i = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
    return np.where(i >= 0, d, np.inf).astype(np.float32), i


def _merge(parts_d: list, parts_i: list, tables: list, k: int) -> list:
    """The k nearest over every segment, per query row as (distances, image ids, x, y,
    scale) lists; ``parts_i`` hold (segment number << 32) + segment row."""
    dist = np.concatenate(parts_d, axis=1)
    ids = np.concatenate(parts_i, axis=1)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(dist, order, 1)
    ids = np.take_along_axis(ids, order, 1)
    found = np.isfinite(dist) & (ids >= 0)
    seg_of, local = ids >> 32, ids & 0xFFFFFFFF
    img = np.empty(ids.shape, object)
    xs = np.zeros(ids.shape, np.float32)
    ys = np.zeros(ids.shape, np.float32)
    ss = np.zeros(ids.shape, np.float32)
    for t, cols in enumerate(tables):
        m = found & (seg_of == t)
        rows = local[m]
        img[m] = cols["names"][cols["code"][rows]]
        xs[m], ys[m], ss[m] = cols["x"][rows], cols["y"][rows], cols["scale"][rows]
    dist = np.sqrt(np.maximum(dist, 0.0))
    out = []
    for qi in range(len(dist)):
        n = int(found[qi].sum())  # found hits come first (sorted by distance)
        out.append((dist[qi, :n].tolist(), img[qi, :n].tolist(), xs[qi, :n].tolist(),
                    ys[qi, :n].tolist(), ss[qi, :n].tolist()))
    return out


_PARTITION = "_default"  # Lite's default partition: the only one the store uses


def _wal_batch(col, columns: dict[str, np.ndarray]):
    """The Arrow batch Lite's insert would write for these rows (auto primary keys and
    sequence numbers taken from the collection's counters), or None for a collection this
    path does not cover (dynamic fields, functions, partition keys, other fields)."""
    import pyarrow as pa

    if (not col._auto_id or col._ingestion_chain or col._bm25_analyzers
            or col._partition_key_field is not None or col._schema.enable_dynamic_field
            or not col._manifest.has_partition(_PARTITION)):
        return None
    schema = col._wal_data_schema
    if set(schema.names) != {"_seq", "_partition", col._pk_name, *columns}:
        return None
    n = len(next(iter(columns.values())))
    arrays = {"_seq": pa.array(np.arange(col._next_seq, col._next_seq + n, dtype=np.uint64)),
              "_partition": pa.array([_PARTITION] * n, pa.string()),
              col._pk_name: pa.array(np.arange(col._next_auto_id, col._next_auto_id + n, dtype=np.int64))}
    for name, values in columns.items():
        kind = schema.field(name).type
        if pa.types.is_fixed_size_list(kind):
            values = np.ascontiguousarray(values, dtype=np.float32)
            if values.shape != (n, kind.list_size):
                raise ValueError(f"{name}: expected ({n}, {kind.list_size}), got {values.shape}")
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), kind.list_size)
        else:
            arrays[name] = pa.array(values, kind)
        if len(arrays[name]) != n:
            raise ValueError(f"{name}: {len(arrays[name])} values for {n} rows")
    return pa.RecordBatch.from_arrays([arrays[f] for f in schema.names], schema=schema)
