"""What the store writes for one image: its checked input, its descriptor rows and its
images row (the fields: the module docstring of ``schema``)."""
from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

from delf_common.features import DelfFeatures
from delf_common.contract import check_id_fits, metadata_text


class NewImage(NamedTuple):
    """One image about to be indexed, checked: its id, the features to store, its
    metadata, that metadata as JSON text and its thumbnail (JPEG bytes, b"": none)."""

    image_id: str
    features: DelfFeatures
    metadata: dict
    meta_text: str
    thumbnail: bytes = b""


def prepare(image_id: str, features: DelfFeatures, metadata: dict | None, thumbnail: bytes | None = None,
            *, stored: int) -> NewImage:
    """Check one image (ValueError / the id's checks) and keep its ``stored`` best-scored
    features (0: all)."""
    check_id_fits(image_id)
    metadata, meta_text = metadata_text(metadata)
    if len(features) and not np.all(np.isfinite(features.descriptors)):
        raise ValueError("descriptors contain NaN or infinity")
    return NewImage(image_id, features.best(stored), metadata, meta_text, bytes(thumbnail or b""))


def feature_rows(image_id: str, features: DelfFeatures, generation: int) -> list[dict]:
    """The descriptor collection's rows for one image (one per feature)."""
    xy = features.locations.tolist()
    scales, scores = features.scales.tolist(), features.scores.tolist()
    return [
        {"image_id": image_id, "idx": i, "x": xy[i][0], "y": xy[i][1], "scale": scales[i],
         "score": scores[i], "generation": generation, "desc": features.descriptors[i]}
        for i in range(len(features))
    ]


def feature_columns(images: list[NewImage], generations: list[int]) -> dict[str, np.ndarray]:
    """The same rows as `feature_rows` for several images, as one array per field."""
    counts = [len(image.features) for image in images]
    feats = [image.features for image in images if len(image.features)]
    if not feats:
        return {}
    loc = np.concatenate([f.locations for f in feats]).astype(np.float32)
    return {
        "image_id": np.repeat(np.array([image.image_id for image in images], dtype=object), counts),
        "idx": np.concatenate([np.arange(len(f), dtype=np.int32) for f in feats]),
        "x": loc[:, 0], "y": loc[:, 1],
        "scale": np.concatenate([f.scales for f in feats]).astype(np.float32),
        "score": np.concatenate([f.scores for f in feats]).astype(np.float32),
        "generation": np.repeat(np.asarray(generations, dtype=np.int64), counts),
        "desc": np.concatenate([f.descriptors for f in feats]).astype(np.float32),
    }


def image_row(image: NewImage, generation: int, with_meta: bool) -> dict:
    """The images collection's row for one image (``meta``: collections that have it)."""
    f = image.features
    row = {"image_id": image.image_id, "metadata": image.meta_text, "width": f.image_size[0],
           "height": f.image_size[1], "num_features": len(f), "pca_id": f.pca_id,
           "model": f.model, "generation": generation, "dummy": [0.0, 0.0]}
    if with_meta:
        row["meta"] = image.metadata
    return row


def info(image: NewImage) -> dict:
    """What ``add`` answers for an image it indexed."""
    f = image.features
    return {"image_id": image.image_id, "metadata": image.metadata, "width": f.image_size[0],
            "height": f.image_size[1], "num_features": len(f), "pca_id": f.pca_id}


def stored_info(row: dict) -> dict:
    """The info of an indexed image (what ``get`` answers) from its images row."""
    return {"image_id": row["image_id"], "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
            "width": int(row["width"]), "height": int(row["height"]),
            "num_features": int(row["num_features"]), "pca_id": row["pca_id"]}


def stored_features(cols: dict[str, np.ndarray], row: dict, dim: int) -> DelfFeatures:
    """An indexed image's features from its descriptor rows ({idx, x, y, scale, score, desc}
    arrays, any order: put back in the order they were added) and its images row."""
    order = np.argsort(cols["idx"], kind="stable")
    n = len(order)
    return DelfFeatures(
        locations=np.stack([cols["x"], cols["y"]], 1).astype(np.float32)[order].reshape(n, 2),
        scales=cols["scale"].astype(np.float32)[order],
        scores=cols["score"].astype(np.float32)[order],
        descriptors=cols["desc"].astype(np.float32).reshape(n, dim)[order],
        image_size=(int(row["width"]), int(row["height"])),
        model=row.get("model", ""),
        pca_id=row["pca_id"],
    )
