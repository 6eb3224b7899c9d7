"""DELF local features and their wire format between services.

Inside a service features are numpy arrays (`DelfFeatures`); on the wire (Celery
messages, msgpack) they are a dict of raw little-endian float32 bytes, so a
1000 x 40 set costs 160 kB rather than a list of Python floats.
"""
from __future__ import annotations

import dataclasses

import numpy as np

WIRE_VERSION = 1


@dataclasses.dataclass
class DelfFeatures:
    """Local features of one photo.

    locations: (N, 2) float32, keypoint centres (x, y) in pixels of the photo as submitted.
    scales: (N,) float32, 1 / pyramid scale the feature came from (DELF's convention).
    scores: (N,) float32, attention (or selection) score.
    descriptors: (N, D) float32, L2-normalised (after PCA when pca_id is set).
    image_size: (width, height) of the photo as submitted.
    model: name of the model configuration that produced them.
    pca_id: identifier of the PCA projection applied ("" when none).
    """

    locations: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]
    model: str = ""
    pca_id: str = ""

    def __post_init__(self) -> None:
        n = len(self.locations)
        self.locations = np.asarray(self.locations, np.float32).reshape(n, 2)
        self.scales = np.asarray(self.scales, np.float32).reshape(n)
        self.scores = np.asarray(self.scores, np.float32).reshape(n)
        descriptors = np.asarray(self.descriptors, np.float32)
        dim = descriptors.shape[-1] if descriptors.ndim == 2 else (descriptors.size // n if n else 0)
        self.descriptors = descriptors.reshape(n, dim)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return len(self.locations)

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def subset(self, keep: np.ndarray) -> "DelfFeatures":
        return dataclasses.replace(
            self,
            locations=self.locations[keep],
            scales=self.scales[keep],
            scores=self.scores[keep],
            descriptors=self.descriptors[keep],
        )

    def best(self, n: int) -> "DelfFeatures":
        """The ``n`` best-scored features (all when ``n`` is 0 or not below their
        number), in their original order."""
        if n <= 0 or n >= len(self):
            return self
        return self.subset(np.sort(np.argsort(-self.scores, kind="stable")[:n]))

    def inside(self, box: tuple[float, float, float, float]) -> "DelfFeatures":
        """The features whose keypoint lies in box = (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        x, y = self.locations[:, 0], self.locations[:, 1]
        return self.subset((x >= x0) & (x < x1) & (y >= y0) & (y < y1))

    def to_wire(self) -> dict:
        return {
            "v": WIRE_VERSION,
            "n": len(self),
            "dim": self.dim,
            "locations": _bytes(self.locations),
            "scales": _bytes(self.scales),
            "scores": _bytes(self.scores),
            "descriptors": _bytes(self.descriptors),
            "image_size": list(self.image_size),
            "model": self.model,
            "pca_id": self.pca_id,
        }

    @classmethod
    def from_wire(cls, wire: dict) -> "DelfFeatures":
        if wire.get("v") != WIRE_VERSION:
            raise ValueError(f"unsupported features wire version {wire.get('v')!r}")
        n, dim = int(wire["n"]), int(wire["dim"])
        return cls(
            locations=_array(wire["locations"], (n, 2)),
            scales=_array(wire["scales"], (n,)),
            scores=_array(wire["scores"], (n,)),
            descriptors=_array(wire["descriptors"], (n, dim)),
            image_size=tuple(wire["image_size"]),
            model=wire.get("model", ""),
            pca_id=wire.get("pca_id", ""),
        )


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def _array(b: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").reshape(shape).astype(np.float32)


def encode_array(a: np.ndarray) -> dict:
    """A numpy array as a msgpack-friendly dict (raw little-endian bytes)."""
    a = np.ascontiguousarray(a)
    dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    return {"dtype": dtype.str, "shape": list(a.shape), "data": a.astype(dtype).tobytes()}


def decode_array(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
