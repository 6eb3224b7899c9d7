"""The descriptor index: DELF local features in Milvus, nearest-neighbour votes.

One code path for both deployments, through pymilvus' ``MilvusClient``:

* **Milvus Lite** (the default): ``DELF_MILVUS_URI`` empty -> the file
  ``$DELF_DATA_DIR/milvus.db``. Lite runs *inside the worker process* (a gRPC
  server on a thread), so only one process may open a file: run the indexer as
  ``celery -A delf_indexer.tasks worker -Q <prefix>.index --pool solo``
  (``--pool threads`` also works: the store serialises its calls with a lock).
* **Milvus server**: ``DELF_MILVUS_URI=http://host:19530`` (+ ``DELF_MILVUS_TOKEN``);
  any number of indexer workers may share it.

Collections (``DELF_COLLECTION`` = ``<name>``): ``<name>_features``, one row per
descriptor, ``<name>_images``, one row per image (their fields: ``schema``), and
``<name>_thumbnails``, one JPEG thumbnail per image that came with one (``thumbnails``), and
``<name>_hashes``, the sha256 of each image's bytes as submitted (``hashes``, ``duplicates``).

Metadata filters (``search(filter={key: value})``, exact equality on every pair) reach
the descriptor search as described in ``filters``.
Replacing an image is ordered so that it is never missing and never doubled in the
images collection: insert the new descriptors under a new generation, delete that
image's descriptors of any other generation, then upsert the images row. While the
old and new descriptors briefly coexist, a query descriptor still votes at most once
per image, so a concurrent search is not skewed.

The collection's PCA projection is the ``pca_id`` of the images it holds: adding
descriptors with another ``pca_id`` (or another dimension) is refused with
``ValueError``; an empty index accepts the first.

Around the store: ``settings`` (IndexSettings: which vector index), ``schema`` (the two
collections), ``checks`` (ids, metadata, filters, quoting), ``filters`` (how a filter
reaches the search), ``lite`` and ``lite_patches`` (the Milvus Lite fast paths, on the
versions ``lite_version`` lists), ``thumbnails`` (the photos' thumbnails), ``voting`` (the pure DELF voting
that ``search`` calls) and ``candidates`` (its answer on the wire).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterable, Sequence

import numpy as np

from delf_common.features import DelfFeatures
from delf_indexer.candidates import candidate_dicts, query_rows
from delf_indexer.checks import (  # noqa: F401 - re-exported: the store's names before the split
    FILTER_KEY, FILTER_MAX_PAIRS, FILTER_MAX_VALUE_BYTES, MAX_ID_LENGTH, METADATA_MAX_LENGTH,
    check_filter, check_image_id, metadata_matches, metadata_text, quote)
from delf_indexer.filters import SearchScope, matching_images, search_scope
from delf_indexer.hashes import HashStore
from delf_indexer import rows
from delf_indexer.lite import LiteFastPath, release_server
from delf_indexer.lite_patches import sample_training, speed_up_flush
from delf_indexer.schema import (  # noqa: F401 - QUERY_*: re-exported
    QUERY_MAX_LIMIT, QUERY_PAGE, api_knn, create_collections, has_field, query_pages, vector_dim)
from delf_indexer.settling import IdleFlush, probe_search
from delf_indexer.settings import LITE_INDEXES, SERVER_INDEXES, IndexerSettings, IndexSettings, is_lite_uri
from delf_indexer.thumbnails import ThumbnailStore
from delf_indexer.voting import fetched_neighbours, vote

log = logging.getLogger(__name__)

INSERT_BATCH = 10000    # rows per insert call
IMAGE_FIELDS = ["image_id", "metadata", "width", "height", "num_features", "pca_id", "model", "generation"]


class DescriptorStore:
    """DELF descriptors of the indexed images, in Milvus (Lite or server)."""

    def __init__(self, uri: str | None = None, token: str | None = None,
                 collection: str | None = None, index: IndexSettings | None = None,
                 settings: IndexerSettings | None = None):
        from pymilvus import MilvusClient

        self.settings = s = settings or IndexerSettings.from_env()  # read once, here
        self.uri = uri or s.milvus_uri
        self.lite = is_lite_uri(self.uri)
        if self.lite:
            self.uri = os.path.abspath(self.uri)
            if not self.uri.endswith(".db"):
                raise ValueError(f"a Milvus Lite URI must be a file path ending in .db, got {self.uri!r}")
            os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        token = s.milvus_token if token is None else token
        name = collection or s.collection
        self.features_name = f"{name}_features"
        self.images_name = f"{name}_images"
        self.index = index or IndexSettings.for_uri(self.uri)
        self.stored_features = s.stored_features  # best-scored descriptors kept per photo
        self._lock = threading.RLock()
        self._fast = LiteFastPath.open(self.uri, self.features_name) if self.lite else None  # None: untested Lite
        self.direct_insert = self._fast is not None and s.lite_direct_insert and speed_up_flush()
        if self._fast is not None:
            sample_training(s.lite_train_points)
        self.direct_rows = 0  # descriptor rows written by the direct path (tests, benchmarks)
        self._dirty = True  # Lite: rows may sit in the memtable
        self._idle_flush = (IdleFlush(self._flush, after=lambda: probe_search(self))  # settling
                            if self._fast and s.lite_direct_search else None)
        self._pca: str | None = None  # Lite: the index's pca_id, read once per write
        self.client = MilvusClient(uri=self.uri, token=token or "")
        self.thumbnails = ThumbnailStore(self.client, f"{name}_thumbnails")
        self.hashes = HashStore(self.client, f"{name}_hashes")
        self._dim: int | None = None
        self._has_meta = True  # the images collection has the `meta` JSON field
        if self.client.has_collection(self.features_name):
            self._dim = vector_dim(self.client, self.features_name)
            if index is None:
                self._adopt_existing_index()
            self._has_meta = has_field(self.client, self.images_name, "meta")
            self.client.load_collection(self.features_name)
            self.client.load_collection(self.images_name)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the client; for Lite also stop the in-process server so its files
        are flushed and another store (or process) can open them."""
        with self._lock:
            if self.client is None:
                return
            if self._idle_flush is not None:
                self._idle_flush.close()
            if self.lite:
                for name in (self.features_name, self.images_name, self.thumbnails.name, self.hashes.name):
                    try:
                        if self.client.has_collection(name):
                            self.client.flush(name)
                    except Exception:  # pragma: no cover - best effort
                        log.exception("flush of %s failed", name)
            self.client.close()
            self.client = None
            if self.lite:
                release_server(self.uri)

    def __enter__(self) -> "DescriptorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ schema
    def _adopt_existing_index(self) -> None:
        """A collection keeps the index it was created with: search it with that type's
        parameters, whatever DELF_MILVUS_INDEX says now."""
        try:
            found = str(self.client.describe_index(self.features_name, "desc").get("index_type", ""))
        except Exception:  # pragma: no cover - an index-less collection or an older server
            log.warning("could not read the index of %s", self.features_name, exc_info=True)
            return
        known = LITE_INDEXES if self.lite else SERVER_INDEXES
        if found and found != self.index.index_type and found in known:
            log.warning("%s was created with a %s index; the settings ask for %s, which only "
                        "applies to a new collection. Searching it as %s.", self.features_name,
                        found, self.index.index_type, found)
            self.index = (IndexSettings.for_lite(found) if self.lite
                          else IndexSettings.for_uri(self.uri, found, search_params={}))

    def _create(self, dim: int) -> None:
        create_collections(self.client, self.features_name, self.images_name, dim, self.index,
                           lite=is_lite_uri(self.uri))
        self._dim = dim
        self._has_meta = True

    @property
    def exists(self) -> bool:
        return self._dim is not None

    # ------------------------------------------------------------ Lite upkeep
    def settle(self) -> None:
        """Make every write so far searchable through the ANN index, however long Lite's index
        build takes (bulk loads, benchmarks; a no-op on a server). A search does not wait."""
        with self._lock:
            self._flush()
            if self._fast is not None and self.exists:
                self._fast.wait_for_index(None)

    def _flush(self) -> None:
        """Lite: the memtable's rows to a segment (indexed by Lite in the background; ``settling``)."""
        with self._lock:
            if self.client is None or not self.lite or not self._dirty or not self.exists:
                return
            self.client.flush(self.features_name)
            self._dirty = False

    def _settle(self, timeout: float | None = 600) -> None:
        """Lite, before a read: flush. The direct search reads an unindexed segment exactly: no
        wait for the build (``settling``); Lite's own search API would scan it by a broadcast of
        gigabytes, so without the direct path a read waits for it (at most ``timeout`` s)."""
        dirty = self._dirty
        self._flush()
        if dirty and self._idle_flush is None and self._fast is not None and self.exists:
            self._fast.wait_for_index(timeout)

    def _wrote(self, rows: int = 0) -> None:
        self._dirty, self._pca = True, None
        if self._idle_flush is not None:
            self._idle_flush.wrote(rows)

    def batch_done(self) -> None:
        """An ingest job completed: on Lite, flush in the background now (``settling``)."""
        if self._idle_flush is not None:
            self._idle_flush.now()

    def _lite_snapshot(self):
        """(segments, tombstones) as Milvus Lite holds them now, or None (LiteFastPath.snapshot)."""
        return self._fast.snapshot() if self._fast is not None else None

    def _direct_knn(self, q: np.ndarray, k: int, deny: set, allow: set | None):
        """``_milvus_knn``'s answer read straight from Lite's segments, or None to use the
        search API (``LiteFastPath.knn``; valid after ``_settle``)."""
        if self._fast is None:
            return None
        return self._fast.knn(q, k, self.index.direct_nprobe, deny, allow)

    def _direct_rows(self, image_id: str, generation: int) -> dict | None:
        """One image's descriptor rows read straight from Lite's segments, or None to use
        the query API (``LiteFastPath.rows``; valid after ``_settle``)."""
        if self._fast is None:
            return None
        return self._fast.rows(image_id, generation, self._dim or 0)

    # ------------------------------------------------------------ images rows
    def _image_rows(self, image_ids: Iterable[str]) -> dict[str, dict]:
        ids = list(dict.fromkeys(image_ids))
        out: dict[str, dict] = {}
        if not ids or not self.exists:
            return out
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            expr = "image_id in [" + ", ".join(quote(x) for x in chunk) + "]"
            for row in self.client.query(self.images_name, filter=expr, output_fields=IMAGE_FIELDS):
                out[row["image_id"]] = row
        return out

    _info = staticmethod(rows.stored_info)

    def _collection_pca(self) -> str | None:
        """pca_id of the indexed images (None when none); on Lite kept until this store
        writes (no other process writes its file), saving a query per search."""
        if self._pca is not None or not self.exists:
            return self._pca
        rows = self.client.query(self.images_name, filter='image_id != ""',
                                 output_fields=["pca_id"], limit=1)
        pca = rows[0]["pca_id"] if rows else None
        self._pca = pca if self.lite else None
        return pca

    # ------------------------------------------------------------ writes
    feature_rows = staticmethod(rows.feature_rows)

    def add(self, image_id: str, features: DelfFeatures, metadata: dict | None = None) -> dict:
        """Index (or replace) one image; returns its info."""
        return self.add_many([(image_id, features, metadata)])[0]

    def add_many(self, items: Sequence[tuple], hashes: dict[str, str] | None = None) -> list[dict]:
        """Index (or replace) several images, each (image_id, features, metadata[,
        thumbnail JPEG]), with few Milvus calls (the bulk path); returns their infos in order.
        ``hashes``: id -> sha256 of the photo's bytes, kept with it (``hashes``).
        Every image is checked before anything is written: one bad image refuses the whole
        call with ValueError. Each image keeps its ``stored_features`` best-scored
        descriptors and gets its own generation, so a replaced image is never missing and
        never doubled (module docstring)."""
        ids = [item[0] for item in items]
        if len(set(ids)) < len(ids):  # the same id twice: one after the other
            return [info for item in items for info in self.add_many([item], hashes)]
        images = [rows.prepare(*item, stored=self.stored_features) for item in items]
        if not images:
            return []
        with self._lock:
            self._ensure_collection(images)
            old = self._image_rows(ids)
            self._check_projection(images, old)
            generation = time.time_ns()
            generations = [generation + k for k in range(len(images))]
            self._insert_features(images, generations)
            image_rows = [rows.image_row(image, g, self._has_meta) for image, g in zip(images, generations)]
            for row in image_rows:
                if row["image_id"] in old:
                    # Only for a replacement: a delete by filter scans the collection. Rows
                    # orphaned by an add that died before its images row was written are
                    # ignored by search (no images row) and removed by the next add of that
                    # id via delete().
                    self.client.delete(self.features_name, filter=(
                        f"image_id == {quote(row['image_id'])} and generation != {row['generation']}"))
            self.thumbnails.write({i.image_id: i.thumbnail for i in images if i.thumbnail}, replaced=old)
            self.hashes.write({i: (hashes or {}).get(i, "") for i in ids}, replaced=old)
            self.client.upsert(self.images_name, image_rows)
            self._wrote(sum(len(image.features) for image in images))
        return [{**rows.info(image), "sha256": (hashes or {}).get(image.image_id, "")} for image in images]

    def _insert_features(self, images: list[rows.NewImage], generations: list[int]) -> None:
        """Write the images' descriptor rows: on Milvus Lite straight as columns when its
        internals allow (``LiteFastPath.insert``), else through the API in batches."""
        if self._fast is not None and self.direct_insert:
            columns = rows.feature_columns(images, generations)
            if not columns or self._fast.insert(columns):
                self.direct_rows += len(columns.get("idx", ()))
                return
        feature_rows = [r for image, g in zip(images, generations)
                        for r in rows.feature_rows(image.image_id, image.features, g)]
        for i in range(0, len(feature_rows), INSERT_BATCH):
            self.client.insert(self.features_name, feature_rows[i:i + INSERT_BATCH])

    def _ensure_collection(self, images: list[rows.NewImage]) -> None:
        """Create the collections for the first image with descriptors (they fix the
        dimension); ValueError for descriptors of another dimension."""
        if not self.exists:
            first = next((image.features for image in images if len(image.features)), None)
            if first is None:
                raise ValueError("the first image of an empty index must have descriptors "
                                 "(they fix the index's dimension)")
            self._create(first.dim)
        for image in images:
            if len(image.features) and image.features.dim != self._dim:
                raise ValueError(f"descriptors have {image.features.dim} dimensions; this index "
                                 f"holds {self._dim}-dimensional descriptors")

    def _check_projection(self, images: list[rows.NewImage], old: dict) -> None:
        """ValueError unless every image's pca_id is the index's (or the index is empty, or
        the image replaces the index's only one: that may change the projection). Images
        of one call share one projection."""
        projections = {image.features.pca_id for image in images}
        if len(projections) > 1:
            raise ValueError(f"these images were projected with different PCAs "
                             f"({', '.join(sorted(map(repr, projections)))}); index them separately")
        current = self._collection_pca()
        wanted = projections.pop()
        if current is None or current == wanted:
            return
        only_this = len(images) == 1 and images[0].image_id in old and self.client.query(
            self.images_name, filter=f"image_id != {quote(images[0].image_id)}",
            output_fields=["image_id"], limit=1) == []
        if not only_this:
            raise ValueError(
                f"descriptors were projected with pca_id {wanted!r} but the "
                f"index holds pca_id {current!r}; re-extract with the same PCA or "
                f"use another collection")

    def delete(self, image_id: str) -> int:
        """Remove an image; returns how many descriptors were removed. KeyError if unknown."""
        check_image_id(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            expr = f"image_id == {quote(image_id)}"
            self.thumbnails.drop([image_id])
            self.hashes.drop([image_id])
            if row is None:
                self.client.delete(self.features_name, filter=expr)  # orphans, if any
                raise KeyError(image_id)
            removed = self._count(self.features_name, expr)
            self.client.delete(self.images_name, filter=expr)
            self.client.delete(self.features_name, filter=expr)
            self._wrote()
            return removed

    # ------------------------------------------------------------ reads
    def _count(self, collection: str, expr: str = "") -> int:
        rows = self.client.query(collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def get(self, image_id: str, thumbnail: bool = False) -> dict:
        """An indexed image's info; with ``thumbnail`` also its ``thumbnail`` (JPEG, b"": none)."""
        check_image_id(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            if row is None:
                raise KeyError(image_id)
            info = {**self._info(row), "sha256": self.hashes.of_ids([image_id]).get(image_id, "")}
            return {**info, "thumbnail": self.thumbnails.get(image_id)} if thumbnail else info

    def get_features(self, image_id: str) -> tuple[dict, DelfFeatures]:
        """An indexed image's info and features (in the order they were added)."""
        check_image_id(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            if row is None:
                raise KeyError(image_id)
            cols = None
            if self.lite and self.settings.lite_direct_search:
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

    def _query_all(self, collection: str, expr: str, fields: list[str]) -> list[dict]:
        return [row for page in query_pages(self.client, collection, expr, fields) for row in page]

    def matching_images(self, filter: dict, limit: int | None = None) -> list[str]:
        """Ids of the indexed images whose metadata holds every pair of ``filter`` (exact
        string equality), at most ``limit`` of them (ask limit + 1 to learn whether more match)."""
        filter = check_filter(filter)
        with self._lock:
            return self._matching_images(filter, limit) if self.exists else []

    def _matching_images(self, filter: dict[str, str], limit: int | None) -> list[str]:
        return matching_images(self.client, self.images_name, self._has_meta, filter, limit)

    def _milvus_knn(self, q: np.ndarray, k: int, expr: str) -> list[tuple[list, list, list, list, list]]:
        """``schema.api_knn`` on the descriptors: the search API (server, or Lite's own path)."""
        return api_knn(self.client, self.features_name, self.index, q, k, expr)

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
        """Shortlist indexed images by nearest-neighbour votes: candidates best first,
        {image_id, votes, metadata, width, height, query_idx, db_xy, db_scale} with the
        arrays encoded for the wire.

        The ``neighbours + 1`` nearest descriptors of each query descriptor (the
        ``DELF_QUERY_FEATURES`` best-scored ones) are fetched and voted on by
        ``delf_indexer.voting.vote`` (the rule, its ``ratio`` test and the
        correspondences are described there). ``filter``: only images whose metadata holds
        every {key: value} pair are candidates (``delf_indexer.filters``: how that
        reaches Milvus); ``exclude``: image ids that are never candidates.
        """
        filter = check_filter(filter)
        shortlist = self.settings.shortlist if shortlist is None else int(shortlist)
        neighbours = self.settings.neighbours if neighbours is None else int(neighbours)
        ratio = self.settings.ratio if ratio is None else float(ratio)
        exclude = [str(x) for x in exclude]
        if shortlist <= 0 or len(features) == 0:
            return []
        with self._lock:
            if not self._searchable_by(features):
                return []
            self._settle()
            scope = search_scope(filter, exclude, lambda limit: self._matching_images(filter, limit),
                                 self.settings.filter_max_images)
            if scope is None:
                return []
            q, chosen = query_rows(features, self.settings.query_features)
            hits = self._knn(q, fetched_neighbours(neighbours), scope)
            info: dict[str, dict] = {}
            keep = None
            if scope.post_filter:  # broad filter: keep the best-voted matching images
                def keep(chunk: list[str]) -> list[str]:
                    rows = self._image_rows(chunk)
                    kept = [i for i in chunk if i in rows and metadata_matches(rows[i], filter)]
                    info.update((i, rows[i]) for i in kept)
                    return kept
            candidates = vote([h[0] for h in hits], [h[1] for h in hits], neighbours, ratio,
                              shortlist, keep=keep)
            if not scope.post_filter:
                info = self._image_rows([c.image_id for c in candidates])
        return candidate_dicts(candidates, hits, info, chosen)

    def _searchable_by(self, features: DelfFeatures) -> bool:
        """Whether the index holds images to search with these query features; ValueError
        when their dimension or PCA projection is not the index's."""
        if not self.exists:
            return False
        if features.dim != self._dim:
            raise ValueError(f"query descriptors have {features.dim} dimensions; this index "
                             f"holds {self._dim}-dimensional descriptors")
        current = self._collection_pca()
        if current is None:
            return False
        if features.pca_id != current:
            raise ValueError(f"query descriptors were projected with pca_id "
                             f"{features.pca_id!r} but the index holds {current!r}")
        return True

    def _knn(self, q: np.ndarray, k: int, scope: SearchScope) -> list[tuple[list, list, list, list, list]]:
        """Per query row: (distances, image ids, x, y, scale) of its k nearest descriptors in
        scope, nearest first: Lite's fast path where it answers, else the search API."""
        hits = None
        if self.lite and self.settings.lite_direct_search:
            hits = self._direct_knn(q, k, deny=scope.deny, allow=scope.allow)
        if hits is None:
            hits = self._milvus_knn(q, k, scope.expr)
        return hits

