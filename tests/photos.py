"""Real photos for the tests, and copies of them warped by known transforms.

The sample photos ship with scikit-image, so the tests run anywhere; the
landmarks-dev photos are read from ../shared when present (never copied here).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "immunohistochemistry", "hubble")


def sample_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's bundled data (no download)."""
    import skimage.data as data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    if name == "hubble":
        return data.hubble_deep_field()
    return getattr(data, name)()


def random_crop(rgb: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A crop at a random place keeping a random share in [lo, hi) of each side, as RGB."""
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, -1)
    rgb = rgb[..., :3]
    h, w = rgb.shape[:2]
    frac = rng.uniform(lo, hi)
    ch, cw = int(h * frac), int(w * frac)
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw])


def jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def warped_query(rgb: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A harder copy of `rgb`: perspective warp, rotation, scale, crop and brighter light.

    Returns (query photo, H) where H (3x3) maps query pixels to pixels of `rgb`:
    the transform a correct search must report.
    """
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    angle = np.deg2rad(rng.uniform(8, 15))
    scale = rng.uniform(0.85, 1.1)
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    # Similarity about the centre, then a mild perspective.
    cx, cy = w / 2, h / 2
    similarity = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]])
    perspective = np.array([[1, 0, 0], [0, 1, 0], [rng.uniform(1e-4, 2e-4), rng.uniform(-1.5e-4, 1.5e-4), 1]])
    db_to_canvas = perspective @ similarity
    corners = cv2.perspectiveTransform(np.float32([[[0, 0], [w, 0], [w, h], [0, h]]]), db_to_canvas)[0]
    # Crop a margin off the warped photo's bounding box (part of the scene is lost).
    x0, y0 = corners.min(0) + 0.08 * np.array([w, h])
    x1, y1 = corners.max(0) - 0.08 * np.array([w, h])
    crop = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]])
    db_to_query = crop @ db_to_canvas
    size = (int(x1 - x0), int(y1 - y0))
    query = cv2.warpPerspective(rgb, db_to_query, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    query = np.clip(query.astype(np.float32) * 1.25 + 10, 0, 255).astype(np.uint8)
    return query, np.linalg.inv(db_to_query)


def map_points(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(np.float32(points).reshape(1, -1, 2), np.float64(H))[0]


def landmarks_dir() -> Path | None:
    """../shared/data/landmarks-dev beside the checkout (or $DELF_LANDMARKS_DIR), if present."""
    env = os.environ.get("DELF_LANDMARKS_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "landmarks-dev")
    for path in candidates:
        if (path / "MANIFEST.tsv").is_file():
            return path
    return None
