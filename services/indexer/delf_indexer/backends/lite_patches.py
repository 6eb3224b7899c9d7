"""Milvus Lite's own write-side code made faster, in this process (patches).

Milvus Lite (milvus-lite 3.2.x, pinned in pyproject.toml) is pure Python around faiss; two
of its steps bound how fast rows become searchable (BENCHMARKS.md, "Indexer write path on
Milvus Lite"):

* ``speed_up_flush``: its memtable flush built its table one Python object per cell;
  the patch builds the same table with Arrow takes.
* ``sample_training``: its IVF index build trains the k-means quantizer of every new
  segment on every vector (faiss' cap, 256 per list, is above a segment's rows); the patch
  caps the training points per list (``DELF_LITE_TRAIN_POINTS``, default 128), as faiss
  itself does for larger inputs. Every row is still indexed; only the centroids are fitted
  on a sample (fewer points: faster, but less even lists, so slower searches).

One more makes it quiet rather than fast:

* ``quiet_alloc_timestamp``: pymilvus' ``create_index`` asks the server for a timestamp
  (AllocTimestamp) and, told UNIMPLEMENTED, goes on without one. Lite's in-process server
  leaves that RPC to the generated base class, which sets UNIMPLEMENTED *and raises*
  NotImplementedError, so grpc's server logs "Exception calling application: Method not
  implemented!" at ERROR with a traceback on every index build: harmless, and alarming in a
  terminal. The patch answers the same UNIMPLEMENTED status without raising.

Like ``delf_indexer.backends.lite_fast``, this touches names Lite does not promise to keep; each patch
changes nothing (answers False) on a Lite version not listed in `delf_indexer.backends.lite_version`,
and checks the names first, changing nothing when they are not as expected.
"""
from __future__ import annotations

import logging

import numpy as np

from delf_indexer.backends.lite_version import lite_internals_allowed

log = logging.getLogger(__name__)

# Lite's index modules whose faiss IVF classes are trained (module, faiss class name).
_IVF_MODULES = (("milvus_lite.index.faiss_ivf_sq8", "IndexIVFScalarQuantizer"),
                ("milvus_lite.index.faiss_ivf_flat", "IndexIVFFlat"))


def speed_up_flush() -> bool:
    """Make Milvus Lite's memtable flush build its table with Arrow takes, a run of rows of
    one insert batch at a time, instead of one Python object per cell (most of a flush's
    time: seconds per 100k rows). Same table; any surprise falls back to Lite's own code.
    Idempotent; False when Lite's memtable is not as expected (nothing changed)."""
    if not lite_internals_allowed():
        return False
    try:
        from milvus_lite.storage.memtable import MemTable

        original = MemTable._build_data_table
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_delf_fast", False):
        return True

    def build(self, rows):
        try:
            table = _take_rows(self._insert_batches, rows, self._data_schema)
        except Exception:  # Lite's internals differ: its own code
            log.warning("fast memtable flush declined; using Milvus Lite's", exc_info=True)
            table = None
        return original(self, rows) if table is None else table

    build._delf_fast = True
    build._delf_original = original
    MemTable._build_data_table = build
    return True


def _take_rows(batches, rows, schema):
    """The Arrow table of `rows` ((batch index, row index) pairs, in order) of `batches`,
    with `schema`'s columns; None for no rows."""
    import pyarrow as pa

    if not rows:
        return None
    where = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    cuts = np.flatnonzero(np.diff(where[:, 0])) + 1
    parts = []
    for start, end in zip(np.r_[0, cuts], np.r_[cuts, len(where)]):
        batch = batches[int(where[start, 0])]
        taken = batch.select(schema.names).take(pa.array(where[start:end, 1]))
        parts.append(pa.Table.from_batches([taken]).cast(schema))
    return pa.concat_tables(parts).combine_chunks()


class _SampledTrainingFaiss:
    """Stands in for the ``faiss`` module inside one Lite index module: the IVF class it
    builds gets ``points`` k-means training points per list at most; every other name is
    faiss' own."""

    def __init__(self, faiss_module, ivf_class: str, points: int):
        self._faiss, self._ivf_class, self.points = faiss_module, ivf_class, points

    def __getattr__(self, name):
        value = getattr(self._faiss, name)
        if name != self._ivf_class:
            return value

        def build(*args, **kwargs):
            index = value(*args, **kwargs)
            if self.points > 0:
                index.cp.max_points_per_centroid = self.points
            return index

        return build


def sample_training(points: int) -> bool:
    """Make Lite's IVF_SQ8 and IVF_FLAT builds train on at most `points` vectors per list
    (0: faiss' default of 256, Lite's own behaviour). Idempotent; a later call changes the
    cap. False when Lite's index modules are not as expected (nothing changed)."""
    import importlib

    if not lite_internals_allowed():
        return False

    import faiss

    modules = []
    for name, ivf_class in _IVF_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            return False
        current = getattr(module, "faiss", None)
        if not (current is faiss or isinstance(current, _SampledTrainingFaiss)):
            return False
        if not hasattr(faiss, ivf_class):
            return False
        modules.append((module, ivf_class, current))
    for module, ivf_class, current in modules:
        if isinstance(current, _SampledTrainingFaiss):
            current.points = int(points)
        else:
            module.faiss = _SampledTrainingFaiss(faiss, ivf_class, int(points))
    return True


def quiet_alloc_timestamp() -> bool:
    """Lite's server answers AllocTimestamp UNIMPLEMENTED without raising (module docstring).
    Idempotent; False when Lite's servicer is not as expected, or implements it (nothing changed)."""
    if not lite_internals_allowed():
        return False
    try:
        import grpc
        from milvus_lite.adapter.grpc.servicer import MilvusServicer
        from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc

        inherited = milvus_pb2_grpc.MilvusServiceServicer.AllocTimestamp
    except (ImportError, AttributeError):
        return False
    current = MilvusServicer.AllocTimestamp
    if getattr(current, "_delf_quiet", False):
        return True
    if current is not inherited:  # Lite implements it now: nothing to quieten
        return False

    def alloc_timestamp(self, request, context):
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("AllocTimestamp is not implemented by Milvus Lite")
        return milvus_pb2.AllocTimestampResponse()

    alloc_timestamp._delf_quiet = True
    MilvusServicer.AllocTimestamp = alloc_timestamp
    return True
