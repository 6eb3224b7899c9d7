"""The index's two Milvus collections: their schemas, what an existing one holds,
reading one page by page, and the descriptors through pymilvus' public API (``api_insert``,
``api_rows``, ``api_knn``: what every backend can fall back on).

Collections (``DELF_COLLECTION`` = ``<name>``):

* ``<name>_features``: one row per descriptor: auto-id ``pk``, ``image_id``, ``idx``
  (position in the image's feature list), ``x``, ``y``, ``scale``, ``score``,
  ``generation`` and ``desc`` (FLOAT_VECTOR of the PCA dimension, L2 metric on unit
  vectors).
* ``<name>_images``: one row per image: ``image_id`` (pk), ``metadata`` (JSON text),
  ``meta`` (the same metadata as a JSON field, for filters; collections created before
  it existed lack it), ``width``, ``height``, ``num_features``, ``pca_id``, ``model``,
  ``generation`` and a 2-d dummy vector (Milvus wants a vector field in every collection).
* ``<name>_thumbnails``: one JPEG thumbnail per image that came with one (``thumbnails``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from delf_common.contract import MAX_ID_BYTES, METADATA_MAX_JSON_BYTES
from delf_indexer import rows
from delf_indexer.checks import quote
from delf_indexer.settings import IndexSettings

QUERY_PAGE = 10000      # rows per query page (Milvus caps offset + limit at 16384)
QUERY_MAX_LIMIT = 16384
INSERT_BATCH = 10000    # descriptor rows per insert call (api_insert)
ROW_FIELDS = ["idx", "x", "y", "scale", "score", "desc"]  # what api_rows reads


def create_collections(client, features_name: str, images_name: str, dim: int,
                       index: IndexSettings, params: dict) -> None:
    """Create and load the descriptors collection (``dim``-d vectors, ``index`` built with
    ``params``: the backend's form of ``index.build_params_for(dim)``) and the images
    collection, both with strong consistency."""
    from pymilvus import DataType, MilvusClient

    s = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    s.add_field("pk", DataType.INT64, is_primary=True)
    s.add_field("image_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
    s.add_field("idx", DataType.INT32)
    s.add_field("x", DataType.FLOAT)
    s.add_field("y", DataType.FLOAT)
    s.add_field("scale", DataType.FLOAT)
    s.add_field("score", DataType.FLOAT)
    s.add_field("generation", DataType.INT64)
    s.add_field("desc", DataType.FLOAT_VECTOR, dim=dim)
    ip = client.prepare_index_params()
    ip.add_index("desc", index_type=index.index_type, metric_type="L2", params=params)
    # Strong consistency: a search right after an add/delete sees it (server).
    client.create_collection(features_name, schema=s, index_params=ip, consistency_level="Strong")

    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("image_id", DataType.VARCHAR, max_length=MAX_ID_BYTES, is_primary=True)
    s.add_field("metadata", DataType.VARCHAR, max_length=METADATA_MAX_JSON_BYTES)
    s.add_field("meta", DataType.JSON)
    s.add_field("width", DataType.INT64)
    s.add_field("height", DataType.INT64)
    s.add_field("num_features", DataType.INT64)
    s.add_field("pca_id", DataType.VARCHAR, max_length=256)
    s.add_field("model", DataType.VARCHAR, max_length=256)
    s.add_field("generation", DataType.INT64)
    s.add_field("dummy", DataType.FLOAT_VECTOR, dim=2)
    ip = client.prepare_index_params()
    ip.add_index("dummy", index_type="FLAT", metric_type="L2")
    client.create_collection(images_name, schema=s, index_params=ip, consistency_level="Strong")
    client.load_collection(features_name)
    client.load_collection(images_name)


def vector_dim(client, features_name: str) -> int:
    """The dimension of an existing descriptors collection's vectors."""
    desc = client.describe_collection(features_name)
    for f in desc["fields"]:
        if f["name"] == "desc":
            return int(f["params"]["dim"])
    raise RuntimeError(f"{features_name} has no desc field")


def has_field(client, collection: str, field: str) -> bool:
    """Whether an existing collection has the field (collections created before the
    images' ``meta`` JSON field lack it)."""
    desc = client.describe_collection(collection)
    return any(f["name"] == field for f in desc["fields"])


def query_pages(client, collection: str, expr: str, fields: list[str]) -> Iterator[list[dict]]:
    """The rows matching ``expr``, ``QUERY_PAGE`` at a time (a query iterator: Milvus caps
    one query's offset + limit)."""
    it = client.query_iterator(collection, batch_size=QUERY_PAGE, filter=expr, output_fields=fields)
    try:
        while True:
            page = it.next()
            if not page:
                break
            yield page
    finally:
        it.close()


def query_all(client, collection: str, expr: str, fields: list[str]) -> list[dict]:
    """Every row matching ``expr`` (``query_pages`` joined)."""
    return [row for page in query_pages(client, collection, expr, fields) for row in page]


def api_insert(client, features_name: str, images: list[rows.NewImage], generations: list[int]) -> None:
    """The images' descriptor rows through the insert API, ``INSERT_BATCH`` at a time."""
    feature_rows = [r for image, g in zip(images, generations)
                    for r in rows.feature_rows(image.image_id, image.features, g)]
    for i in range(0, len(feature_rows), INSERT_BATCH):
        client.insert(features_name, feature_rows[i:i + INSERT_BATCH])


def api_rows(client, features_name: str, image_id: str, generation: int) -> dict[str, np.ndarray]:
    """One image's descriptor rows of one generation ({idx, x, y, scale, score, desc} arrays)
    through the query API."""
    expr = f"image_id == {quote(image_id)} and generation == {int(generation)}"
    hits = query_all(client, features_name, expr, ROW_FIELDS)
    cols = {name: np.array([h[name] for h in hits]) for name in ROW_FIELDS[:-1]}
    cols["desc"] = np.array([h["desc"] for h in hits], np.float32)
    return cols


def api_knn(client, features_name: str, index: IndexSettings, q, k: int,
            expr: str) -> list[tuple[list, list, list, list, list]]:
    """Per query row: (distances, image ids, x, y, scale) of its k nearest descriptors,
    nearest first, through the Milvus search API (server, or Lite's own search path)."""
    out = []
    bs = max(1, index.query_batch)
    for start in range(0, len(q), bs):
        results = client.search(
            features_name, data=q[start:start + bs], limit=k, filter=expr,
            output_fields=["image_id", "x", "y", "scale"], anns_field="desc",
            search_params={"metric_type": "L2", "params": dict(index.search_params)},
        )
        for hits in results:
            dists = [float(h["distance"]) for h in hits]
            if index.squared_l2:
                dists = [float(np.sqrt(max(d, 0.0))) for d in dists]
            out.append((dists, [h["entity"]["image_id"] for h in hits],
                        [float(h["entity"]["x"]) for h in hits], [float(h["entity"]["y"]) for h in hits],
                        [float(h["entity"]["scale"]) for h in hits]))
    return out
