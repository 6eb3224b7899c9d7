"""The descriptor index: DELF local features in Milvus, nearest-neighbour votes.

One store for every deployment: the Milvus it keeps its rows in is a storage backend
(``delf_indexer.backends``, picked once from ``DELF_MILVUS_URI``: a Milvus Lite file in
this process by default, or a Milvus server), which owns the pymilvus client and whatever
differs between deployments (the vector index, how descriptor rows are written, read and
searched, when new rows become searchable). The store keeps the rules, the same on each.

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

Around the store: ``backends`` (where the rows live), ``settings`` (IndexSettings: which
vector index), ``schema`` (the collections), ``checks`` (quoting; the input rules are
``delf_common.contract``'s), ``rows`` (what is written for an image, and read back),
``filters`` (how a filter reaches the search), ``thumbnails`` and ``hashes`` (side
collections), ``voting`` (the pure DELF voting that ``search`` calls) and ``candidates``
(its answer on the wire).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Sequence

from delf_common.contract import check_filter, check_id_fits
from delf_common.features import DelfFeatures
from delf_indexer import rows
from delf_indexer.backends import backend_for
from delf_indexer.candidates import candidate_dicts, query_rows
from delf_indexer.checks import metadata_matches, quote
from delf_indexer.filters import matching_images, search_scope
from delf_indexer.hashes import HashStore
from delf_indexer.schema import has_field, query_all
from delf_indexer.settings import IndexerSettings, IndexSettings
from delf_indexer.settling import probe_search
from delf_indexer.thumbnails import ThumbnailStore
from delf_indexer.voting import fetched_neighbours, vote

log = logging.getLogger(__name__)

IMAGE_FIELDS = ["image_id", "metadata", "width", "height", "num_features", "pca_id", "model", "generation"]


class DescriptorStore:
    """DELF descriptors of the indexed images, in Milvus (through a storage backend)."""

    def __init__(self, uri: str | None = None, token: str | None = None,
                 collection: str | None = None, index: IndexSettings | None = None,
                 settings: IndexerSettings | None = None):
        self.settings = s = settings or IndexerSettings.from_env()  # read once, here
        name = collection or s.collection
        self.features_name = f"{name}_features"
        self.images_name = f"{name}_images"
        self.stored_features = s.stored_features  # best-scored descriptors kept per photo
        self._lock = threading.RLock()
        uri = uri or s.milvus_uri
        self.backend = backend_for(uri)(
            uri, token=s.milvus_token if token is None else token, settings=s,
            features_name=self.features_name, lock=self._lock, index=index,
            warm=lambda: probe_search(self))
        self.uri = self.backend.uri
        self._pca: str | None = None  # the index's pca_id, kept until a write (a sole writer)
        self.client = self.backend.client
        self.thumbnails = ThumbnailStore(self.client, f"{name}_thumbnails")
        self.hashes = HashStore(self.client, f"{name}_hashes")
        self.dim: int | None = None  # the descriptors' dimension; None: no collection yet
        self._has_meta = True  # the images collection has the `meta` JSON field
        if self.client.has_collection(self.features_name):
            self.dim = self.backend.open_collection(adopt_index=index is None)
            self._has_meta = has_field(self.client, self.images_name, "meta")
            self.client.load_collection(self.images_name)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the backend (it persists what it holds, and frees the Lite file for another
        store or process)."""
        with self._lock:
            if self.client is None:
                return
            self.backend.close([self.features_name, self.images_name, self.thumbnails.name, self.hashes.name])
            self.client = None

    def __enter__(self) -> "DescriptorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def index(self) -> IndexSettings:
        """The vector index the descriptors are searched with (the backend's)."""
        return self.backend.index

    @index.setter
    def index(self, value: IndexSettings) -> None:
        self.backend.index = value

    @property
    def exists(self) -> bool:
        return self.dim is not None

    # ------------------------------------------------------------ settling
    def settle(self) -> None:
        """Make every write so far searchable through the ANN index, however long the
        backend's index build takes (bulk loads, benchmarks). A search does not wait."""
        with self._lock:
            self.backend.settle()

    def _wrote(self, rows: int = 0) -> None:
        self._pca = None
        self.backend.wrote(rows)

    def batch_done(self) -> None:
        """An ingest job completed: the backend makes its rows searchable now (``settling``)."""
        self.backend.batch_done()

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

    def collection_pca(self) -> str | None:
        """pca_id of the indexed images (None when none); kept until this store writes when
        it is the only writer (a Lite file), saving a query per search."""
        if self._pca is not None or not self.exists:
            return self._pca
        found = self.client.query(self.images_name, filter='image_id != ""',
                                  output_fields=["pca_id"], limit=1)
        pca = found[0]["pca_id"] if found else None
        self._pca = pca if self.backend.sole_writer else None
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
            self.backend.insert(images, generations)
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

    def _ensure_collection(self, images: list[rows.NewImage]) -> None:
        """Create the collections for the first image with descriptors (they fix the
        dimension); ValueError for descriptors of another dimension."""
        if not self.exists:
            first = next((image.features for image in images if len(image.features)), None)
            if first is None:
                raise ValueError("the first image of an empty index must have descriptors "
                                 "(they fix the index's dimension)")
            self.backend.create_collections(self.images_name, first.dim)
            self.dim, self._has_meta = first.dim, True
        for image in images:
            if len(image.features) and image.features.dim != self.dim:
                raise ValueError(f"descriptors have {image.features.dim} dimensions; this index "
                                 f"holds {self.dim}-dimensional descriptors")

    def _check_projection(self, images: list[rows.NewImage], old: dict) -> None:
        """ValueError unless every image's pca_id is the index's (or the index is empty, or
        the image replaces the index's only one: that may change the projection). Images
        of one call share one projection."""
        projections = {image.features.pca_id for image in images}
        if len(projections) > 1:
            raise ValueError(f"these images were projected with different PCAs "
                             f"({', '.join(sorted(map(repr, projections)))}); index them separately")
        current = self.collection_pca()
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
        check_id_fits(image_id)
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
        check_id_fits(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            if row is None:
                raise KeyError(image_id)
            info = {**self._info(row), "sha256": self.hashes.of_ids([image_id]).get(image_id, "")}
            return {**info, "thumbnail": self.thumbnails.get(image_id)} if thumbnail else info

    def get_features(self, image_id: str) -> tuple[dict, DelfFeatures]:
        """An indexed image's info and features (in the order they were added)."""
        check_id_fits(image_id)
        with self._lock:
            row = self._image_rows([image_id]).get(image_id)
            if row is None:
                raise KeyError(image_id)
            cols = self.backend.image_rows(image_id, int(row["generation"]), self.dim or 0)
        return self._info(row), rows.stored_features(cols, row, self.dim or 0)

    def _query_all(self, collection: str, expr: str, fields: list[str]) -> list[dict]:
        return query_all(self.client, collection, expr, fields)

    def matching_images(self, filter: dict, limit: int | None = None) -> list[str]:
        """Ids of the indexed images whose metadata holds every pair of ``filter`` (exact
        string equality), at most ``limit`` of them (ask limit + 1 to learn whether more match)."""
        filter = check_filter(filter)
        with self._lock:
            return self._matching_images(filter, limit) if self.exists else []

    def _matching_images(self, filter: dict[str, str], limit: int | None) -> list[str]:
        return matching_images(self.client, self.images_name, self._has_meta, filter, limit)

    def stats(self) -> dict:
        with self._lock:
            if not self.exists:
                return {"images": 0, "descriptors": 0, "pca_id": ""}
            return {
                "images": self._count(self.images_name),
                "descriptors": self._count(self.features_name),
                "pca_id": self.collection_pca() or "",
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
            self.backend.settle_for_read()
            scope = search_scope(filter, exclude, lambda limit: self._matching_images(filter, limit),
                                 self.settings.filter_max_images)
            if scope is None:
                return []
            q, chosen = query_rows(features, self.settings.query_features)
            hits = self.backend.knn(q, fetched_neighbours(neighbours), scope)
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
        if features.dim != self.dim:
            raise ValueError(f"query descriptors have {features.dim} dimensions; this index "
                             f"holds {self.dim}-dimensional descriptors")
        current = self.collection_pca()
        if current is None:
            return False
        if features.pca_id != current:
            raise ValueError(f"query descriptors were projected with pca_id "
                             f"{features.pca_id!r} but the index holds {current!r}")
        return True
