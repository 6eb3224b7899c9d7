"""The descriptor index: DELF local features in Milvus, nearest-neighbour votes.

One code path for both deployments, through pymilvus' ``MilvusClient``:

* **Milvus Lite** (the default): ``DELF_MILVUS_URI`` empty -> the file
  ``$DELF_DATA_DIR/milvus.db``. Lite runs *inside the worker process* (a gRPC
  server on a thread), so only one process may open a file: run the indexer as
  ``celery -A delf_indexer.tasks worker -Q <prefix>.index --pool solo``
  (``--pool threads`` also works: the store serialises its calls with a lock).
* **Milvus server**: ``DELF_MILVUS_URI=http://host:19530`` (+ ``DELF_MILVUS_TOKEN``);
  any number of indexer workers may share it.

Collections (``DELF_COLLECTION`` = ``<name>``):

* ``<name>_features``: one row per descriptor: auto-id ``pk``, ``image_id``, ``idx``
  (position in the image's feature list), ``x``, ``y``, ``scale``, ``score``,
  ``generation`` and ``desc`` (FLOAT_VECTOR of the PCA dimension, L2 metric on unit
  vectors).
* ``<name>_images``: one row per image: ``image_id`` (pk), ``metadata`` (JSON text),
  ``meta`` (the same metadata as a JSON field, for filters; collections created before
  it existed lack it), ``width``, ``height``, ``num_features``, ``pca_id``, ``model``,
  ``generation`` and a 2-d dummy vector (Milvus wants a vector field in every collection).

Metadata filters (``search(filter={key: value})``, exact equality on every pair) are
resolved in two steps, so descriptor rows carry no metadata (1000 rows per photo; a
metadata change would rewrite them all): first the images collection answers which
photos match (``meta["key"] == "value"``, checked again in Python), then

* a *selective* filter (at most ``DELF_FILTER_MAX_IMAGES`` photos) is pushed into the
  descriptor search as ``image_id in [...]``: the kNN runs among those photos' descriptors
  only, so the result is exactly the unfiltered algorithm over the matching subset;
* a *broad* filter (more photos than that) is applied after voting: the kNN runs over
  everything, votes for non-matching photos are dropped and the shortlist is filled from
  the matching ones. Neighbours of non-matching photos still take kNN slots, which is
  harmless when most photos match (the only way to exceed the limit in a large index
  is a filter that keeps a large share), and the expression stays small.

Replacing an image is ordered so that it is never missing and never doubled in the
images collection: insert the new descriptors under a new generation, delete that
image's descriptors of any other generation, then upsert the images row. While the
old and new descriptors briefly coexist, a query descriptor still votes at most once
per image, so a concurrent search is not skewed.

The collection's PCA projection is the ``pca_id`` of the images it holds: adding
descriptors with another ``pca_id`` (or another dimension) is refused with
``ValueError``; an empty index accepts the first.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from typing import Iterable

import numpy as np

from delf_common import config
from delf_common.features import DelfFeatures, encode_array

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 512
METADATA_MAX_LENGTH = 65535
INSERT_BATCH = 2000     # rows per insert call
# Lite segments up to this many rows are searched exactly (BLAS) by the direct path: a
# freshly flushed segment of a few photos has few vectors per IVF list, so a small nprobe
# would miss most of them; an exact scan of 20k rows costs ~1 GFLOP per 1000 queries.
EXACT_SEGMENT_ROWS = 20_000
QUERY_PAGE = 10000      # rows per query page (Milvus caps offset + limit at 16384)
QUERY_MAX_LIMIT = 16384
FILTER_KEY = re.compile(r"^[\w.:/-]{1,128}$")  # metadata keys a filter may name
FILTER_MAX_PAIRS = 16
FILTER_MAX_VALUE_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """Vector index of the descriptors: the per-deployment choice, in one place.

    What Milvus Lite 3.2 is: a pure-Python engine (Parquet segments of at most 100k rows,
    a WAL/memtable, tombstones) with one faiss index per segment. Index types it builds:
    BRUTE_FORCE/FLAT (numpy), HNSW and HNSW_SQ (faiss, param M/efConstruction, search ef),
    IVF_FLAT and IVF_SQ8 (faiss, nlist, search nprobe), AUTOINDEX (= HNSW); not IVF_PQ or
    DiskANN. It reports squared L2 like a server. Its search API does per-row Python work
    on every call (a validity mask over every row of every segment, a dict per hit, gRPC
    to pymilvus and back): ~0.3 s at 10k descriptors, ~0.9 s at 100k, several seconds at
    1M. Hence the indexer's direct path for Lite (``DescriptorStore._direct_knn``): the
    same segments, tombstones and filters searched through their faiss indexes with numpy
    masks, ``direct_nprobe`` lists per large segment (16 of DELF_LITE_NLIST=1024: half the
    vectors scanned of the earlier 8 of 128, at the same or better landmarks-dev mAP with
    885k distractors; BENCHMARKS.md, "Lite IVF lists").

    Milvus Lite 3.x through its search API (measured on 2 cores, 100k x 40-d unit vectors, 1000 queries, k=11):
      * FLAT / BRUTE_FORCE: Lite computes distances with a (queries x rows x dim)
        numpy broadcast; 1000 queries over 100k rows wanted > 20 GB and was killed.
        Unusable beyond toy sizes.
      * HNSW (faiss): search 0.34 s per 1000 queries, but building a 100k-row
        segment took 24 s (efConstruction 100; 6.6 s at 40 with recall@11 0.78 on
        random data), and Lite rebuilds the index of every segment it compacts
        (segments grow to 100k rows) in a background thread.
      * IVF_FLAT: build 2-3 s per 100k rows; search 0.32 s per 1000 queries in one
        call. Lite clamps nlist to the segment's rows; the API path probes a quarter
        of the lists (nlist 1024, nprobe 256), so small, freshly flushed segments stay
        accurate there; the direct path scans segments of up to 20k rows exactly.
        -> chosen for Lite (small deployments).
      The time per call is dominated by Lite's per-hit Python work, not the ANN:
      1000 queries in one call ~0.33 s, in calls of 200 ~0.55 s, of 50 ~1.1 s, so
      queries go in batches of 500.
    Milvus server (C++ knowhere, proper growing-segment handling): chosen per deployment
    with DELF_MILVUS_INDEX (``SERVER_INDEXES``). auto = HNSW, the usual best recall/latency
    trade-off while the 40-d vectors fit in RAM; IVF_FLAT builds in a fraction of HNSW's
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
    # than EXACT_SEGMENT_ROWS; smaller ones are scanned exactly); see BENCHMARKS.md.
    direct_nprobe: int = 16

    @classmethod
    def for_uri(cls, uri: str, index_type: str | None = None,
                search_params: dict | None = None) -> "IndexSettings":
        """The index for a deployment: Lite -> IVF_FLAT; a server -> DELF_MILVUS_INDEX
        (auto: HNSW) with DELF_MILVUS_SEARCH_PARAMS over that type's defaults."""
        index_type = index_type or config.get("DELF_MILVUS_INDEX")
        if is_lite_uri(uri):
            if index_type not in ("auto", "IVF_FLAT"):
                raise ValueError(
                    f"DELF_MILVUS_INDEX={index_type} is for a Milvus server; Milvus Lite (a .db file) "
                    f"always uses IVF_FLAT, which the indexer's direct search reads. Unset it or "
                    f"point DELF_MILVUS_URI at a server")
            nlist = int(config.get("DELF_LITE_NLIST"))
            # The API path (DELF_LITE_DIRECT_SEARCH=0) probes a quarter of a segment's lists.
            return cls("IVF_FLAT", {"nlist": nlist}, {"nprobe": max(1, nlist // 4)}, query_batch=500,
                       direct_nprobe=int(config.get("DELF_LITE_NPROBE")))
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

    def build_params_for(self, dim: int) -> dict:
        """Build parameters for `dim`-d vectors (IVF_PQ: sub-vectors of 4 dimensions
        where dim allows, else 2, else 1)."""
        params = dict(self.build_params)
        if self.index_type == "IVF_PQ" and not params.get("m"):
            sub = next(d for d in (4, 2, 1) if dim % d == 0)
            params["m"] = dim // sub
        return params


# Server index types: (build parameters, search parameters), for 40-d DELF descriptors with
# 11 neighbours per query descriptor. HNSW: M 16 / ef 64 gave the same landmarks-dev mAP as
# Lite's IVF (BENCHMARKS.md); IVF_*: 1024 lists per segment (a server segment holds about
# 2M of these rows), 16 probed; DISKANN: Milvus' defaults, search list 100.
SERVER_INDEXES: dict[str, tuple[dict, dict]] = {
    "HNSW": ({"M": 16, "efConstruction": 200}, {"ef": 64}),
    "IVF_FLAT": ({"nlist": 1024}, {"nprobe": 16}),
    "IVF_SQ8": ({"nlist": 1024}, {"nprobe": 16}),
    "IVF_PQ": ({"nlist": 1024, "m": 0, "nbits": 8}, {"nprobe": 16}),
    "DISKANN": ({}, {"search_list": 100}),
}


def is_lite_uri(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def quote(value: str) -> str:
    """A string literal for a Milvus filter expression (double-quoted, escaped).

    Backslash and double quote are escaped, control characters become \\n, \\t or
    \\uXXXX; everything else (quotes ', unicode) is kept verbatim. Both the server
    (Go strconv.Unquote) and Milvus Lite parse these escapes, so an id can never
    close the literal and inject an expression.
    """
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False)


def check_filter(filter: dict | None) -> dict[str, str]:
    """A metadata filter as the store takes it: {key: value}, every pair must match exactly.

    Keys: 1-128 word characters or ``. : / -`` (no quotes or spaces, so a key is the same
    JSON path on every Milvus version); values: any text without control characters, at
    most 1024 bytes (UTF-8); at most 16 pairs. ValueError says what is wrong.
    """
    if filter is None:
        return {}
    if not isinstance(filter, dict):
        raise ValueError(f"a filter is a map of metadata keys to values, got {type(filter).__name__}")
    if len(filter) > FILTER_MAX_PAIRS:
        raise ValueError(f"the filter has {len(filter)} pairs; the limit is {FILTER_MAX_PAIRS}")
    out = {}
    for key, value in filter.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("filter keys and values must be strings")
        if not FILTER_KEY.match(key):
            raise ValueError(f"filter key {key[:40]!r} is not 1-128 letters, digits or _ . : / -")
        if len(value.encode("utf-8")) > FILTER_MAX_VALUE_BYTES:
            raise ValueError(f"the filter value of {key!r} is longer than {FILTER_MAX_VALUE_BYTES} bytes")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"the filter value of {key!r} contains control characters")
        out[key] = value
    return out


def _metadata_matches(row: dict, filter: dict[str, str]) -> bool:
    meta = json.loads(row["metadata"]) if row.get("metadata") else {}
    return all(meta.get(k) == v for k, v in filter.items())


def check_image_id(image_id: str) -> None:
    if not isinstance(image_id, str) or not image_id:
        raise ValueError("image_id must be a non-empty string")
    if len(image_id.encode("utf-8")) > MAX_ID_LENGTH:
        raise ValueError(f"image_id is longer than {MAX_ID_LENGTH} bytes (UTF-8)")


class DescriptorStore:
    """DELF descriptors of the indexed images, in Milvus (Lite or server)."""

    def __init__(self, uri: str | None = None, token: str | None = None,
                 collection: str | None = None, index: IndexSettings | None = None):
        from pymilvus import MilvusClient

        self.uri = uri or config.milvus_uri()
        self.lite = is_lite_uri(self.uri)
        if self.lite:
            self.uri = os.path.abspath(self.uri)
            if not self.uri.endswith(".db"):
                raise ValueError(f"a Milvus Lite URI must be a file path ending in .db, got {self.uri!r}")
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        token = config.get("DELF_MILVUS_TOKEN") if token is None else token
        name = collection or config.get("DELF_COLLECTION")
        self.features_name = f"{name}_features"
        self.images_name = f"{name}_images"
        self.index = index or IndexSettings.for_uri(self.uri)
        self._lock = threading.RLock()
        self._seg_cols: dict = {}  # Lite segment -> column arrays (see _direct_knn)
        self._dirty = True  # Lite: rows may sit in the memtable / unindexed segments
        self.client = MilvusClient(uri=self.uri, token=token or "")
        self._dim: int | None = None
        self._has_meta = True  # the images collection has the `meta` JSON field
        if self.client.has_collection(self.features_name):
            self._dim = self._features_dim()
            if not self.lite and index is None:
                self._adopt_existing_index()
            self._has_meta = self._images_have_meta()
            self.client.load_collection(self.features_name)
            self.client.load_collection(self.images_name)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the client; for Lite also stop the in-process server so its files
        are flushed and another store (or process) can open them."""
        with self._lock:
            if self.client is None:
                return
            if self.lite:
                for name in (self.features_name, self.images_name):
                    try:
                        if self.client.has_collection(name):
                            self.client.flush(name)
                    except Exception:  # pragma: no cover - best effort
                        log.exception("flush of %s failed", name)
            self.client.close()
            self.client = None
            if self.lite:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)

    def __enter__(self) -> "DescriptorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ schema
    def _features_dim(self) -> int:
        desc = self.client.describe_collection(self.features_name)
        for f in desc["fields"]:
            if f["name"] == "desc":
                return int(f["params"]["dim"])
        raise RuntimeError(f"{self.features_name} has no desc field")

    def _adopt_existing_index(self) -> None:
        """A server collection keeps the index it was created with: search it with that
        type's parameters, whatever DELF_MILVUS_INDEX says now."""
        try:
            found = str(self.client.describe_index(self.features_name, "desc").get("index_type", ""))
        except Exception:  # pragma: no cover - an index-less collection or an older server
            log.warning("could not read the index of %s", self.features_name, exc_info=True)
            return
        if found and found != self.index.index_type and found in SERVER_INDEXES:
            log.warning("%s was created with a %s index; DELF_MILVUS_INDEX asks for %s, which only "
                        "applies to a new collection. Searching it as %s.", self.features_name,
                        found, self.index.index_type, found)
            self.index = IndexSettings.for_uri(self.uri, found, search_params={})

    def _images_have_meta(self) -> bool:
        desc = self.client.describe_collection(self.images_name)
        return any(f["name"] == "meta" for f in desc["fields"])

    def _create(self, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        s = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        s.add_field("pk", DataType.INT64, is_primary=True)
        s.add_field("image_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        s.add_field("idx", DataType.INT32)
        s.add_field("x", DataType.FLOAT)
        s.add_field("y", DataType.FLOAT)
        s.add_field("scale", DataType.FLOAT)
        s.add_field("score", DataType.FLOAT)
        s.add_field("generation", DataType.INT64)
        s.add_field("desc", DataType.FLOAT_VECTOR, dim=dim)
        ip = self.client.prepare_index_params()
        params = self.index.build_params_for(dim)
        if is_lite_uri(self.uri):
            # pymilvus 3 sends index parameters as flat key/values (a server reads those);
            # Milvus Lite 3.2 reads only a JSON "params" entry and silently builds its
            # default (nlist 128) otherwise.
            params = {"params": params}
        ip.add_index("desc", index_type=self.index.index_type, metric_type="L2", params=params)
        # Strong consistency: a search right after an add/delete sees it (server).
        self.client.create_collection(self.features_name, schema=s, index_params=ip,
                                      consistency_level="Strong")

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("image_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH, is_primary=True)
        s.add_field("metadata", DataType.VARCHAR, max_length=METADATA_MAX_LENGTH)
        s.add_field("meta", DataType.JSON)
        s.add_field("width", DataType.INT64)
        s.add_field("height", DataType.INT64)
        s.add_field("num_features", DataType.INT64)
        s.add_field("pca_id", DataType.VARCHAR, max_length=256)
        s.add_field("model", DataType.VARCHAR, max_length=256)
        s.add_field("generation", DataType.INT64)
        s.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)
        ip = self.client.prepare_index_params()
        ip.add_index("dummy", index_type="FLAT", metric_type="L2")
        self.client.create_collection(self.images_name, schema=s, index_params=ip,
                                      consistency_level="Strong")
        self.client.load_collection(self.features_name)
        self.client.load_collection(self.images_name)
        self._dim = dim
        self._has_meta = True

    @property
    def exists(self) -> bool:
        return self._dim is not None

    # ------------------------------------------------------------ Lite upkeep
    def _settle(self) -> None:
        """Milvus Lite only: make every row searchable through the ANN index.

        Lite searches its memtable and any segment whose index is not built yet by
        a numpy broadcast (queries x rows x dim floats: gigabytes for a few hundred
        queries), and builds indexes in a background thread after a flush. So
        before a search that follows writes: flush, then wait for that background
        compaction + index build. (Private hook of milvus-lite 3.x; without it we
        only flush.) A Milvus server needs none of this.
        """
        if not self.lite or not self._dirty or not self.exists:
            return
        self.client.flush(self.features_name)
        try:
            from milvus_lite.server_manager import server_manager_instance

            entry = server_manager_instance._servers.get(self.uri)
            if entry is not None:
                entry[1].get_collection(self.features_name)._wait_for_bg(timeout=600)
        except Exception:  # pragma: no cover - depends on milvus-lite internals
            log.warning("could not wait for Milvus Lite's background index build", exc_info=True)
        self._dirty = False

    # ------------------------------------------------------------ images rows
    def _image_rows(self, image_ids: Iterable[str]) -> dict[str, dict]:
        ids = list(dict.fromkeys(image_ids))
        out: dict[str, dict] = {}
        if not ids or not self.exists:
            return out
        fields = ["image_id", "metadata", "width", "height", "num_features", "pca_id",
                  "model", "generation"]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            expr = "image_id in [" + ", ".join(quote(x) for x in chunk) + "]"
            for row in self.client.query(self.images_name, filter=expr, output_fields=fields):
                out[row["image_id"]] = row
        return out

    @staticmethod
    def _info(row: dict) -> dict:
        return {
            "image_id": row["image_id"],
            "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
            "width": int(row["width"]),
            "height": int(row["height"]),
            "num_features": int(row["num_features"]),
            "pca_id": row["pca_id"],
        }

    def _collection_pca(self) -> str | None:
        """pca_id of the indexed images (None when the index holds none)."""
        if not self.exists:
            return None
        rows = self.client.query(self.images_name, filter='image_id != ""',
                                 output_fields=["pca_id"], limit=1)
        return rows[0]["pca_id"] if rows else None

    # ------------------------------------------------------------ writes
    @staticmethod
    def feature_rows(image_id: str, features: DelfFeatures, generation: int) -> list[dict]:
        """The descriptor collection's rows for one image (one per feature)."""
        return [
            {
                "image_id": image_id,
                "idx": i,
                "x": float(features.locations[i, 0]),
                "y": float(features.locations[i, 1]),
                "scale": float(features.scales[i]),
                "score": float(features.scores[i]),
                "generation": generation,
                "desc": features.descriptors[i],
            }
            for i in range(len(features))
        ]

    def add(self, image_id: str, features: DelfFeatures, metadata: dict | None = None) -> dict:
        """Index (or replace) one image; returns its info."""
        check_image_id(image_id)
        metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta_text = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
        if len(meta_text.encode("utf-8")) > METADATA_MAX_LENGTH:
            raise ValueError(f"metadata is longer than {METADATA_MAX_LENGTH} bytes as JSON")
        n = len(features)
        if n and not np.all(np.isfinite(features.descriptors)):
            raise ValueError("descriptors contain NaN or infinity")
        with self._lock:
            if not self.exists:
                if n == 0:
                    raise ValueError("the first image of an empty index must have descriptors "
                                     "(they fix the index's dimension)")
                self._create(features.dim)
            if n and features.dim != self._dim:
                raise ValueError(f"descriptors have {features.dim} dimensions; this index holds "
                                 f"{self._dim}-dimensional descriptors")
            current = self._collection_pca()
            old = self._image_rows([image_id])
            if current is not None and current != features.pca_id:
                # Replacing the only image of the index may change its projection.
                only_this = bool(old) and self.client.query(
                    self.images_name, filter=f"image_id != {quote(image_id)}",
                    output_fields=["image_id"], limit=1) == []
                if not only_this:
                    raise ValueError(
                        f"descriptors were projected with pca_id {features.pca_id!r} but the "
                        f"index holds pca_id {current!r}; re-extract with the same PCA or "
                        f"use another collection")
            generation = time.time_ns()
            rows = self.feature_rows(image_id, features, generation)
            for i in range(0, n, INSERT_BATCH):
                self.client.insert(self.features_name, rows[i:i + INSERT_BATCH])
            if old:
                # Only for a replacement: a delete by filter scans the collection
                # (~0.25 s at 30k rows in Lite). Rows orphaned by an add that died
                # before its images row was written are ignored by search (no
                # images row) and removed by the next add of that id via delete().
                self.client.delete(self.features_name,
                                   filter=f"image_id == {quote(image_id)} and generation != {generation}")
            image_row = {
                "image_id": image_id,
                "metadata": meta_text,
                "width": features.image_size[0],
                "height": features.image_size[1],
                "num_features": n,
                "pca_id": features.pca_id,
                "model": features.model,
                "generation": generation,
                "dummy": [0.0, 0.0],
            }
            if self._has_meta:
                image_row["meta"] = metadata
            self.client.upsert(self.images_name, [image_row])
            self._dirty = True
        return {"image_id": image_id, "metadata": metadata, "width": features.image_size[0],
                "height": features.image_size[1], "num_features": n, "pca_id": features.pca_id}

    def delete(self, image_id: str) -> int:
        """Remove an image; returns how many descriptors were removed. KeyError if unknown."""
        check_image_id(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            expr = f"image_id == {quote(image_id)}"
            if row is None:
                self.client.delete(self.features_name, filter=expr)  # orphans, if any
                raise KeyError(image_id)
            removed = self._count(self.features_name, expr)
            self.client.delete(self.images_name, filter=expr)
            self.client.delete(self.features_name, filter=expr)
            self._dirty = True
            return removed

    # ------------------------------------------------------------ reads
    def _count(self, collection: str, expr: str = "") -> int:
        rows = self.client.query(collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def get(self, image_id: str) -> dict:
        check_image_id(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
        if row is None:
            raise KeyError(image_id)
        return self._info(row)

    def get_features(self, image_id: str) -> tuple[dict, DelfFeatures]:
        """An indexed image's info and features (in the order they were added)."""
        check_image_id(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            if row is None:
                raise KeyError(image_id)
            cols = None
            if self.lite and config.get("DELF_LITE_DIRECT_SEARCH"):
                self._settle()
                cols = self._direct_rows(image_id, int(row["generation"]))
            if cols is None:
                expr = f"image_id == {quote(image_id)} and generation == {int(row['generation'])}"
                hits = self._query_all(self.features_name, expr,
                                       ["idx", "x", "y", "scale", "score", "desc"])
                cols = {name: np.array([h[name] for h in hits])
                        for name in ("idx", "x", "y", "scale", "score")}
                cols["desc"] = np.array([h["desc"] for h in hits], np.float32)
        order = np.argsort(cols["idx"], kind="stable")
        n = len(order)
        feats = DelfFeatures(
            locations=np.stack([cols["x"], cols["y"]], 1).astype(np.float32)[order].reshape(n, 2),
            scales=cols["scale"].astype(np.float32)[order],
            scores=cols["score"].astype(np.float32)[order],
            descriptors=cols["desc"].astype(np.float32).reshape(n, self._dim or 0)[order],
            image_size=(int(row["width"]), int(row["height"])),
            model=row.get("model", ""),
            pca_id=row["pca_id"],
        )
        return self._info(row), feats

    def _direct_rows(self, image_id: str, generation: int) -> dict | None:
        """One image's descriptor rows read straight from Milvus Lite's segments (as
        ``_direct_knn``): a filtered query scans every row in Python, ~13 s at 1M
        descriptors on 2 loaded cores; this takes milliseconds. None: use the query API."""
        try:
            import pyarrow as pa

            snapshot = self._lite_snapshot()
            if snapshot is None:
                return None
            segments, tomb = snapshot
            parts: dict[str, list] = {k: [] for k in ("idx", "x", "y", "scale", "score", "desc")}
            for seg in segments:
                if seg.num_rows == 0:
                    continue
                cols = self._segment_columns(seg)
                code = np.flatnonzero(cols["names"] == image_id)
                if len(code) == 0:
                    continue
                rows = np.flatnonzero((cols["code"] == code[0]) & ~self._deleted(cols, tomb))
                if len(rows) == 0:
                    continue
                take = pa.array(rows)
                gen = seg.table.column("generation").take(take).to_numpy()
                rows = rows[gen == generation]
                take = pa.array(rows)
                for name in ("idx", "scale", "score"):
                    parts[name].append(seg.table.column(name).take(take).to_numpy())
                parts["x"].append(cols["x"][rows])
                parts["y"].append(cols["y"][rows])
                vectors, _ = seg.vector_data("desc")
                parts["desc"].append(np.asarray(vectors[rows], np.float32))
            if not parts["idx"]:
                return {k: np.zeros((0, self._dim or 0) if k == "desc" else 0, np.float32) for k in parts}
            return {k: np.concatenate(v) for k, v in parts.items()}
        except (AttributeError, KeyError, TypeError) as exc:  # pragma: no cover - other internals
            log.warning("Milvus Lite direct read unavailable (%s); using the query API", exc)
            return None

    def _lite_snapshot(self):
        """(segments, tombstones) of the descriptors collection as Milvus Lite holds them now,
        or None when the direct path cannot answer (not Lite, or rows still in its memtable).
        Raises AttributeError/KeyError/TypeError when Lite's internals differ."""
        col = self._lite_collection()
        if col is None or col._memtable.size() != 0:
            return None
        segments, delta = col._read_snapshot()
        tomb = self._tombstones(delta)
        return None if tomb is None else (segments, tomb)

    @staticmethod
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

    @staticmethod
    def _deleted(cols: dict, tomb) -> np.ndarray:
        """Rows of a segment shadowed by a later tombstone."""
        if not tomb:
            return np.zeros(len(cols["pk"]), bool)
        t_pk, t_seq = tomb
        pos = np.minimum(np.searchsorted(t_pk, cols["pk"]), len(t_pk) - 1)
        return (t_pk[pos] == cols["pk"]) & (t_seq[pos] > cols["seq"])

    def _query_all(self, collection: str, expr: str, fields: list[str]) -> list[dict]:
        out: list[dict] = []
        it = self.client.query_iterator(collection, batch_size=QUERY_PAGE, filter=expr,
                                        output_fields=fields)
        try:
            while True:
                page = it.next()
                if not page:
                    break
                out.extend(page)
        finally:
            it.close()
        return out

    def matching_images(self, filter: dict, limit: int | None = None) -> list[str]:
        """Ids of the indexed images whose metadata holds every pair of ``filter`` (exact
        string equality), at most ``limit`` of them (ask limit + 1 to learn whether more match)."""
        filter = check_filter(filter)
        with self._lock:
            if not self.exists:
                return []
            return self._matching_images(filter, limit)

    def _matching_images(self, filter: dict[str, str], limit: int | None) -> list[str]:
        # The JSON-field expression narrows the scan in Milvus; the exact check in Python
        # is the rule (and the whole filter on a collection created without `meta`).
        if self._has_meta and filter:
            expr = " and ".join(f"meta[{quote(k)}] == {quote(v)}" for k, v in sorted(filter.items()))
        else:
            expr = 'image_id != ""'
        out: list[str] = []
        if self._has_meta and filter and limit is not None and limit <= QUERY_MAX_LIMIT:
            # one call (no iterator) when the answer fits a page: the usual case in search
            rows = self.client.query(self.images_name, filter=expr, limit=limit,
                                     output_fields=["image_id", "metadata"])
            if len(rows) < limit:  # all JSON matches seen: the exact check decides
                return [r["image_id"] for r in rows if _metadata_matches(r, filter)]
        it = self.client.query_iterator(self.images_name, batch_size=QUERY_PAGE, filter=expr,
                                        output_fields=["image_id", "metadata"])
        try:
            while True:
                page = it.next()
                if not page:
                    break
                for row in page:
                    if _metadata_matches(row, filter):
                        out.append(row["image_id"])
                        if limit is not None and len(out) >= limit:
                            return out
        finally:
            it.close()
        return out

    def _milvus_knn(self, q: np.ndarray, k: int, expr: str) -> list[tuple[list, list, list, list, list]]:
        """Per query row: (distances, image ids, x, y, scale) of its k nearest descriptors,
        nearest first, through the Milvus search API (server, or Lite's own search path)."""
        out = []
        bs = max(1, self.index.query_batch)
        for start in range(0, len(q), bs):
            results = self.client.search(
                self.features_name, data=q[start:start + bs], limit=k, filter=expr,
                output_fields=["image_id", "x", "y", "scale"], anns_field="desc",
                search_params={"metric_type": "L2", "params": dict(self.index.search_params)},
            )
            for hits in results:
                dists = [float(h["distance"]) for h in hits]
                if self.index.squared_l2:
                    dists = [float(np.sqrt(max(d, 0.0))) for d in dists]
                out.append((dists, [h["entity"]["image_id"] for h in hits],
                            [float(h["entity"]["x"]) for h in hits], [float(h["entity"]["y"]) for h in hits],
                            [float(h["entity"]["scale"]) for h in hits]))
        return out

    def _lite_collection(self):
        """Milvus Lite's in-process collection engine (milvus-lite 3.x internals), or None."""
        try:
            from milvus_lite.server_manager import server_manager_instance

            entry = server_manager_instance._servers.get(self.uri)
            return entry[1].get_collection(self.features_name) if entry is not None else None
        except Exception:  # pragma: no cover - depends on milvus-lite internals
            return None

    def _segment_columns(self, seg) -> dict:
        """Per Lite segment (immutable Parquet file): pks, image names per row, x, y, scale
        as arrays."""
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

    def _direct_knn(self, q: np.ndarray, k: int, deny: set, allow: set | None):
        """The k nearest descriptors of each query row, read straight from Milvus Lite's
        per-segment faiss indexes (milvus-lite 3.x internals), or None to use the public
        search API instead.

        Why: Lite's search path does per-row Python work on every call - a validity mask
        over *all* rows of every segment (tombstones, upsert dedup) and a dict per hit,
        passed through gRPC and parsed again by pymilvus - about 2/3 of a 1000-vector
        search at 100k descriptors, and growing with the index. Here the same snapshot
        (segments + tombstones, under Lite's lock) is searched with numpy masks: rows
        deleted by a later tombstone or of excluded / non-allowed images are left out
        through a faiss IDSelectorBitmap. Segments with an IVF index are searched with
        the configured nprobe; segments without one (small, not yet indexed) exactly.
        Valid only when nothing is waiting in Lite's memtable (``_settle`` flushed it);
        otherwise, or when the internals differ, the public path answers.
        """
        try:
            import faiss

            snapshot = self._lite_snapshot()
            if snapshot is None:
                return None
            segments, tomb = snapshot
            live = {(seg.file_path, seg.num_rows) for seg in segments}
            for key in [key for key in self._seg_cols if key not in live]:
                del self._seg_cols[key]
            nq = len(q)
            nprobe = self.index.direct_nprobe
            parts_d, parts_i, tables = [], [], []
            for seg in segments:
                if seg.num_rows == 0:
                    continue
                cols = self._segment_columns(seg)
                valid = ~self._deleted(cols, tomb)
                if deny or allow is not None:
                    names = cols["names"]
                    ok = np.array([(allow is None or n in allow) and n not in deny for n in names], bool)
                    valid &= ok[cols["code"]]
                n_valid = int(valid.sum())
                if n_valid == 0:
                    continue
                kk = min(k, n_valid)
                index = seg.indexes.get("desc")
                fi = getattr(index, "_index", None)
                if (fi is not None and isinstance(fi, faiss.IndexIVF) and fi.ntotal == seg.num_rows
                        and seg.num_rows > EXACT_SEGMENT_ROWS):
                    params = faiss.SearchParametersIVF()
                    params.nprobe = min(nprobe, fi.nlist)
                    if n_valid < seg.num_rows:
                        bits = np.packbits(valid, bitorder="little")
                        params.sel = faiss.IDSelectorBitmap(seg.num_rows, faiss.swig_ptr(bits))
                    d, i = fi.search(q, kk, params=params)
                else:  # a small segment (or one without an IVF index yet): exact
                    rows = np.flatnonzero(valid)
                    vectors, _ = seg.vector_data("desc")
                    d, i = faiss.knn(q, np.ascontiguousarray(vectors[rows], np.float32), kk)
                    i = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
                d = np.where(i >= 0, d, np.inf).astype(np.float32)
                parts_d.append(d)
                parts_i.append(np.where(i >= 0, i + (len(tables) << 32), -1))
                tables.append(cols)
            if not tables:
                return [([], [], [], [], []) for _ in range(nq)]
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
            for qi in range(nq):
                n = int(found[qi].sum())  # found hits come first (sorted by distance)
                out.append((dist[qi, :n].tolist(), img[qi, :n].tolist(), xs[qi, :n].tolist(),
                            ys[qi, :n].tolist(), ss[qi, :n].tolist()))
            return out
        except (AttributeError, KeyError, TypeError) as exc:  # pragma: no cover - other internals
            log.warning("Milvus Lite direct search unavailable (%s); using the search API", exc)
            return None

    def stats(self) -> dict:
        with self._lock:
            if not self.exists:
                return {"images": 0, "descriptors": 0, "pca_id": ""}
            return {
                "images": self._count(self.images_name),
                "descriptors": self._count(self.features_name),
                "pca_id": self._collection_pca() or "",
            }

    # ------------------------------------------------------------ search
    def search(self, features: DelfFeatures, shortlist: int | None = None,
               neighbours: int | None = None, ratio: float | None = None,
               exclude: Iterable[str] = (), filter: dict | None = None) -> list[dict]:
        """Shortlist indexed images by nearest-neighbour votes.

        For each query descriptor the ``neighbours + 1`` nearest descriptors are
        fetched; neighbour j (j < neighbours) votes for its image when its distance
        is below ``ratio`` x the distance of the last fetched one (with fewer than
        ``neighbours + 1`` results - a tiny index - every fetched neighbour votes).
        A query descriptor votes at most once per image. Images are ranked by
        votes (ties: the smaller summed distance of the voting neighbours).

        Correspondences: for every query descriptor with *any* fetched neighbour in
        a shortlisted image - voting or not - its nearest descriptor in that image.
        The ratio test is a good ranking signal but drops true matches on repeated
        structure and when several database images of the same place crowd the
        neighbour list; RANSAC (MAGSAC) tolerates the extra outliers, and more true
        correspondences mean more inliers for true pairs.

        ``filter``: only images whose metadata holds every {key: value} pair are
        candidates (see the module docstring for how it reaches Milvus).
        """
        filter = check_filter(filter)
        shortlist = config.get("DELF_SHORTLIST") if shortlist is None else int(shortlist)
        neighbours = config.get("DELF_NEIGHBOURS") if neighbours is None else int(neighbours)
        ratio = config.get("DELF_RATIO") if ratio is None else float(ratio)
        exclude = [str(x) for x in exclude]
        if shortlist <= 0 or len(features) == 0:
            return []
        with self._lock:
            if not self.exists:
                return []
            if features.dim != self._dim:
                raise ValueError(f"query descriptors have {features.dim} dimensions; this index "
                                 f"holds {self._dim}-dimensional descriptors")
            current = self._collection_pca()
            if current is None:
                return []
            if features.pca_id != current:
                raise ValueError(f"query descriptors were projected with pca_id "
                                 f"{features.pca_id!r} but the index holds {current!r}")
            self._settle()
            expr = ("image_id not in [" + ", ".join(quote(x) for x in exclude) + "]") if exclude else ""
            post_filter = False
            allowed: list[str] = []
            if filter:
                max_ids = max(1, config.get("DELF_FILTER_MAX_IMAGES"))
                left_out = set(exclude)
                allowed = [i for i in self._matching_images(filter, max_ids + 1 + len(left_out))
                           if i not in left_out]
                if not allowed:
                    return []
                if len(allowed) <= max_ids:
                    expr = "image_id in [" + ", ".join(quote(x) for x in allowed) + "]"
                else:
                    post_filter = True
            k = neighbours + 1
            votes: dict[str, int] = {}
            vote_dist: dict[str, float] = {}
            # image -> {query_idx: (distance, x, y, scale)}: nearest fetched neighbour in that image
            nearest: dict[str, dict[int, tuple[float, float, float, float]]] = {}
            q = np.ascontiguousarray(features.descriptors, np.float32)
            chosen = None  # query rows used (DELF_QUERY_FEATURES): the best-scored ones
            limit = config.get("DELF_QUERY_FEATURES")
            if 0 < limit < len(q):
                chosen = np.sort(np.argsort(-np.asarray(features.scores), kind="stable")[:limit])
                q = np.ascontiguousarray(q[chosen])
            hits_per_query = None
            if self.lite and config.get("DELF_LITE_DIRECT_SEARCH"):
                hits_per_query = self._direct_knn(
                    q, k, deny=set(exclude),
                    allow=set(allowed) if filter and not post_filter else None)
            if hits_per_query is None:
                hits_per_query = self._milvus_knn(q, k, expr)
            for qi, (dists, imgs, xs, ys, ss) in enumerate(hits_per_query):
                if not dists:
                    continue
                bar = ratio * dists[-1] if len(dists) >= k else float("inf")
                voted: set[str] = set()
                for j, img in enumerate(imgs):
                    d = dists[j]
                    near = nearest.setdefault(img, {})
                    if qi not in near or d < near[qi][0]:
                        near[qi] = (d, xs[j], ys[j], ss[j])
                    if j < neighbours and d < bar and img not in voted:
                        voted.add(img)
                        votes[img] = votes.get(img, 0) + 1
                        vote_dist[img] = vote_dist.get(img, 0.0) + d
            ordered = sorted(votes, key=lambda i: (-votes[i], vote_dist[i], i))
            if post_filter:  # broad filter: keep the best-voted matching images
                ranked, info = [], {}
                for start in range(0, len(ordered), 500):
                    chunk = ordered[start:start + 500]
                    rows = self._image_rows(chunk)
                    for img in chunk:
                        if img in rows and _metadata_matches(rows[img], filter):
                            ranked.append(img)
                            info[img] = rows[img]
                    if len(ranked) >= shortlist:
                        break
                ranked = ranked[:shortlist]
            else:
                ranked = ordered[:shortlist]
                info = self._image_rows(ranked)
        out = []
        for img in ranked:
            row = info.get(img)
            if row is None:  # deleted while we searched
                continue
            near = nearest[img]
            rows = sorted(near)
            xy = np.array([near[i][1:3] for i in rows], np.float32).reshape(len(rows), 2)
            db_scale = np.array([near[i][3] for i in rows], np.float32)
            qidx = np.array(rows if chosen is None else chosen[rows], np.int32)
            out.append({
                "image_id": img,
                "votes": votes[img],
                "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
                "width": int(row["width"]),
                "height": int(row["height"]),
                "query_idx": encode_array(qidx),
                "db_xy": encode_array(xy),
                "db_scale": encode_array(db_scale),
            })
        return out
