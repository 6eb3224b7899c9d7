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
  ``width``, ``height``, ``num_features``, ``pca_id``, ``model``, ``generation`` and a
  2-d dummy vector (Milvus wants a vector field in every collection).

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
QUERY_PAGE = 10000      # rows per query page (Milvus caps offset + limit at 16384)


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """Vector index of the descriptors: the per-deployment choice, in one place.

    Milvus Lite 3.x (measured on 2 cores, 100k x 40-d unit vectors, 1000 queries, k=11):
      * FLAT / BRUTE_FORCE: Lite computes distances with a (queries x rows x dim)
        numpy broadcast; 1000 queries over 100k rows wanted > 20 GB and was killed.
        Unusable beyond toy sizes.
      * HNSW (faiss): search 0.34 s per 1000 queries, but building a 100k-row
        segment took 24 s (efConstruction 100; 6.6 s at 40 with recall@11 0.78 on
        random data), and Lite rebuilds the index of every segment it compacts
        (segments grow to 100k rows) in a background thread.
      * IVF_FLAT: build 2-3 s per 100k rows; search 0.32 s per 1000 queries in one
        call. Lite clamps nlist to the segment's rows, so few lists with a large
        nprobe keep small, freshly flushed segments accurate: nlist 128, nprobe 32
        scans ~1/4 of a segment.  -> chosen for Lite (small deployments).
      The time per call is dominated by Lite's per-hit Python work, not the ANN:
      1000 queries in one call ~0.33 s, in calls of 200 ~0.55 s, of 50 ~1.1 s, so
      queries go in batches of 500.
    Milvus server (C++ knowhere, proper growing-segment handling): HNSW, the usual
    best recall/latency trade-off for a few million 40-d vectors that fit in RAM.
    For hundreds of millions of descriptors use IVF_PQ / IVF_SQ8 (the paper used
    PQ with an inverted file) - change it here.
    """

    index_type: str
    build_params: dict
    search_params: dict
    query_batch: int  # query vectors per search call
    # Milvus servers report squared L2 distances, Milvus Lite the plain distance;
    # the ratio test is defined on plain Euclidean distances.
    squared_l2: bool = False

    @classmethod
    def for_uri(cls, uri: str) -> "IndexSettings":
        if is_lite_uri(uri):
            return cls("IVF_FLAT", {"nlist": 128}, {"nprobe": 32}, query_batch=500)
        return cls("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64}, query_batch=500,
                   squared_l2=True)


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
        self._dirty = True  # Lite: rows may sit in the memtable / unindexed segments
        self.client = MilvusClient(uri=self.uri, token=token or "")
        self._dim: int | None = None
        if self.client.has_collection(self.features_name):
            self._dim = self._features_dim()
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
        ip.add_index("desc", index_type=self.index.index_type, metric_type="L2",
                     params=dict(self.index.build_params))
        # Strong consistency: a search right after an add/delete sees it (server).
        self.client.create_collection(self.features_name, schema=s, index_params=ip,
                                      consistency_level="Strong")

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("image_id", DataType.VARCHAR, max_length=MAX_ID_LENGTH, is_primary=True)
        s.add_field("metadata", DataType.VARCHAR, max_length=METADATA_MAX_LENGTH)
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
            rows = [
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
                for i in range(n)
            ]
            for i in range(0, n, INSERT_BATCH):
                self.client.insert(self.features_name, rows[i:i + INSERT_BATCH])
            if old:
                # Only for a replacement: a delete by filter scans the collection
                # (~0.25 s at 30k rows in Lite). Rows orphaned by an add that died
                # before its images row was written are ignored by search (no
                # images row) and removed by the next add of that id via delete().
                self.client.delete(self.features_name,
                                   filter=f"image_id == {quote(image_id)} and generation != {generation}")
            self.client.upsert(self.images_name, [{
                "image_id": image_id,
                "metadata": meta_text,
                "width": features.image_size[0],
                "height": features.image_size[1],
                "num_features": n,
                "pca_id": features.pca_id,
                "model": features.model,
                "generation": generation,
                "dummy": [0.0, 0.0],
            }])
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
            expr = f"image_id == {quote(image_id)} and generation == {int(row['generation'])}"
            hits = self._query_all(self.features_name, expr,
                                   ["idx", "x", "y", "scale", "score", "desc"])
        hits.sort(key=lambda h: h["idx"])
        n = len(hits)
        feats = DelfFeatures(
            locations=np.array([[h["x"], h["y"]] for h in hits], np.float32).reshape(n, 2),
            scales=np.array([h["scale"] for h in hits], np.float32),
            scores=np.array([h["score"] for h in hits], np.float32),
            descriptors=np.array([h["desc"] for h in hits], np.float32).reshape(n, self._dim or 0),
            image_size=(int(row["width"]), int(row["height"])),
            model=row.get("model", ""),
            pca_id=row["pca_id"],
        )
        return self._info(row), feats

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
               exclude: Iterable[str] = ()) -> list[dict]:
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
        """
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
            k = neighbours + 1
            votes: dict[str, int] = {}
            vote_dist: dict[str, float] = {}
            # image -> {query_idx: (distance, x, y)}: nearest fetched neighbour in that image
            nearest: dict[str, dict[int, tuple[float, float, float]]] = {}
            q = np.ascontiguousarray(features.descriptors, np.float32)
            bs = max(1, self.index.query_batch)
            for start in range(0, len(q), bs):
                results = self.client.search(
                    self.features_name, data=q[start:start + bs], limit=k, filter=expr,
                    output_fields=["image_id", "x", "y"], anns_field="desc",
                    search_params={"metric_type": "L2", "params": dict(self.index.search_params)},
                )
                for offset, hits in enumerate(results):
                    qi = start + offset
                    if not hits:
                        continue
                    dists = [float(h["distance"]) for h in hits]
                    if self.index.squared_l2:
                        dists = [float(np.sqrt(max(d, 0.0))) for d in dists]
                    bar = ratio * dists[-1] if len(hits) >= k else float("inf")
                    voted: set[str] = set()
                    for j, h in enumerate(hits):
                        ent = h["entity"]
                        img = ent["image_id"]
                        d = dists[j]
                        near = nearest.setdefault(img, {})
                        if qi not in near or d < near[qi][0]:
                            near[qi] = (d, float(ent["x"]), float(ent["y"]))
                        if j < neighbours and d < bar and img not in voted:
                            voted.add(img)
                            votes[img] = votes.get(img, 0) + 1
                            vote_dist[img] = vote_dist.get(img, 0.0) + d
            ranked = sorted(votes, key=lambda i: (-votes[i], vote_dist[i], i))[:shortlist]
            info = self._image_rows(ranked)
        out = []
        for img in ranked:
            row = info.get(img)
            if row is None:  # deleted while we searched
                continue
            near = nearest[img]
            qidx = np.array(sorted(near), np.int32)
            xy = np.array([near[i][1:] for i in qidx], np.float32).reshape(len(qidx), 2)
            out.append({
                "image_id": img,
                "votes": votes[img],
                "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
                "width": int(row["width"]),
                "height": int(row["height"]),
                "query_idx": encode_array(qidx),
                "db_xy": encode_array(xy),
            })
        return out
