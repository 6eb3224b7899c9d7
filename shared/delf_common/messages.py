"""Typed messages of the search path, beside ``DelfFeatures`` (delf_common.features).

A search's messages between the services, each a small dataclass with ``to_wire()`` /
``from_wire()`` as DelfFeatures has:

* ``SearchCandidate``: one shortlisted photo and its tentative correspondences, as the
  indexer's ``delf.index.search`` answers (``candidates``) and ``delf.verify`` takes them;
* ``VerifyQuery``: the query side of ``delf.verify`` (keypoints, image size, box);
* ``VerifiedMatch``: one photo as ``delf.verify`` answers it (``matches``), with which
  correspondences are inliers when asked.

The wire is what the services sent before these classes existed, key for key and
encoding for encoding (arrays as ``encode_array`` dicts), so that a rolling upgrade can
mix versions; ``from_wire`` accepts the older senders' forms (no ``db_scale``, no query
``scales``, candidates without metadata or size). docs/CONTRACTS.md lists the fields.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from delf_common.features import decode_array, encode_array


@dataclasses.dataclass
class SearchCandidate:
    """A shortlisted photo: for each correspondence i, the query feature ``query_idx[i]``
    (its row in the features the gateway sent) has its nearest descriptor in this photo at
    ``db_xy[i]``, found at ``db_scale[i]`` (1 / pyramid scale, as DelfFeatures.scales)."""

    image_id: str
    votes: int
    query_idx: np.ndarray                 # (M,) query feature rows; int32 on the wire
    db_xy: np.ndarray                     # (M, 2) float32
    db_scale: np.ndarray | None = None    # (M,) float32; None from older indexers
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    width: int = 0                        # of the indexed photo (0: not sent)
    height: int = 0

    def __post_init__(self) -> None:
        self.query_idx = np.asarray(self.query_idx).astype(np.int64, copy=False).reshape(-1)
        self.db_xy = np.asarray(self.db_xy).astype(np.float32, copy=False).reshape(-1, 2)
        if self.db_scale is not None:
            self.db_scale = np.asarray(self.db_scale).astype(np.float32, copy=False).reshape(-1)

    def to_wire(self) -> dict:
        wire = {
            "image_id": self.image_id,
            "votes": int(self.votes),
            "metadata": dict(self.metadata),
            "width": int(self.width),
            "height": int(self.height),
            "query_idx": encode_array(self.query_idx.astype(np.int32)),
            "db_xy": encode_array(self.db_xy),
        }
        if self.db_scale is not None:
            wire["db_scale"] = encode_array(self.db_scale)
        return wire

    @classmethod
    def from_wire(cls, wire: dict) -> "SearchCandidate":
        """KeyError, TypeError or ValueError when malformed."""
        db_scale = wire.get("db_scale")
        return cls(
            image_id=wire["image_id"],
            votes=int(wire.get("votes", 0)),
            query_idx=decode_array(wire["query_idx"]),
            db_xy=decode_array(wire["db_xy"]),
            db_scale=None if db_scale is None else decode_array(db_scale),
            metadata=dict(wire.get("metadata") or {}),
            width=int(wire.get("width", 0)),
            height=int(wire.get("height", 0)),
        )


@dataclasses.dataclass
class VerifyQuery:
    """The query's keypoints for ``delf.verify``: locations (N, 2) and scales (N,) of the
    features the gateway sent the indexer, the query image's size, and the box (x0, y0,
    x1, y1) the search was cut to, if any."""

    locations: np.ndarray                 # (N, 2) float32
    image_size: tuple[int, int]           # (width, height)
    scales: np.ndarray | None = None      # (N,) float32; None from older gateways
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        self.locations = np.asarray(self.locations).astype(np.float32, copy=False).reshape(-1, 2)
        if self.scales is not None:
            self.scales = np.asarray(self.scales).astype(np.float32, copy=False).reshape(-1)
            if len(self.scales) != len(self.locations):
                raise ValueError(f"query has {len(self.scales)} scales for {len(self.locations)} locations")
        width, height = self.image_size  # ValueError unless two values
        self.image_size = (int(width), int(height))
        if self.box is not None:
            box = [float(v) for v in self.box]
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box}")
            self.box = tuple(box)

    def to_wire(self) -> dict:
        wire = {"locations": encode_array(self.locations)}
        if self.scales is not None:
            wire["scales"] = encode_array(self.scales)
        wire["image_size"] = list(self.image_size)
        wire["box"] = list(self.box) if self.box else None
        return wire

    @classmethod
    def from_wire(cls, wire: dict) -> "VerifyQuery":
        """KeyError, TypeError or ValueError (saying what) when malformed."""
        scales = wire.get("scales")
        return cls(
            locations=decode_array(wire["locations"]),
            image_size=tuple(wire["image_size"]),
            scales=None if scales is None else decode_array(scales),
            box=wire.get("box"),
        )


@dataclasses.dataclass
class VerifiedMatch:
    """One candidate after geometric verification: its inliers, whether they verify it,
    and the query -> photo transform (9 floats, row-major) with the query's (box) corners
    in the photo (TL, TR, BR, BL), both empty when not verified.

    ``inlier_idx``, only when the search asked for correspondences: the positions, in the
    candidate's correspondences (``SearchCandidate.query_idx`` / ``db_xy``), of RANSAC's
    inliers (empty when no transform was fitted); None when not asked (or an older verifier)."""

    image_id: str
    votes: int
    inliers: int
    verified: bool
    transform: list[float] = dataclasses.field(default_factory=list)
    corners: list[list[float]] = dataclasses.field(default_factory=list)
    inlier_idx: np.ndarray | None = None  # (K,) int32 on the wire

    def __post_init__(self) -> None:
        if self.inlier_idx is not None:
            self.inlier_idx = np.asarray(self.inlier_idx).astype(np.int64, copy=False).reshape(-1)

    def to_wire(self) -> dict:
        wire = {
            "image_id": self.image_id,
            "votes": int(self.votes),
            "inliers": int(self.inliers),
            "verified": bool(self.verified),
            "transform": [float(v) for v in self.transform],
            "corners": [[float(x), float(y)] for x, y in self.corners],
        }
        if self.inlier_idx is not None:
            wire["inlier_idx"] = encode_array(self.inlier_idx.astype(np.int32))
        return wire

    @classmethod
    def from_wire(cls, wire: dict) -> "VerifiedMatch":
        inlier_idx = wire.get("inlier_idx")
        return cls(
            image_id=wire["image_id"],
            votes=int(wire.get("votes", 0)),
            inliers=int(wire.get("inliers", 0)),
            verified=bool(wire.get("verified", False)),
            transform=[float(v) for v in wire.get("transform") or []],
            corners=[[float(x), float(y)] for x, y in wire.get("corners") or []],
            inlier_idx=None if inlier_idx is None else decode_array(inlier_idx),
        )
