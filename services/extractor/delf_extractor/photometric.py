"""Dark photos lifted before extraction: a night street, a backlit facade, a dim room.

The backbone was trained on ImageNet's mostly well-lit photos; on a photo whose median
lightness is a few percent of white its features sit on lamps and noise, and a night photo
matches other night photos better than the same place by day. ``lift_dark`` brightens such a
photo before the network sees it: a gamma curve that brings its median lightness to
``TARGET_LIGHTNESS``, then contrast-limited adaptive histogram equalisation (CLAHE) of the
lightness, so that facades lit by street lamps get the local contrast a daylight photo has.
Photos at or above the bar are returned as they are (no copy), so a well-lit collection
extracts exactly as before. The same rule runs for indexed photos and for queries, so a dark
photo meets its lifted partner either way. Chosen and measured per condition in
BENCHMARKS.md ("Dark photos lifted before extraction").
"""
from __future__ import annotations

import cv2
import numpy as np

TARGET_LIGHTNESS = 110.0   # median CIE L* (0-255 scale, OpenCV's 8-bit Lab) after the gamma
CLAHE_CLIP = 2.0
CLAHE_TILES = (8, 8)
PROBE_SIDE = 256           # the median is read on a copy at most this large


def lightness(rgb: np.ndarray) -> float:
    """Median lightness of a photo (OpenCV 8-bit Lab L: 0 black, 255 white), read on every
    k-th pixel (at most about PROBE_SIDE per side): a dark photo's is below ~50, a daylight
    street's 90-160."""
    step = max(1, max(rgb.shape[:2]) // PROBE_SIDE)
    probe = np.ascontiguousarray(rgb[::step, ::step])
    return float(np.median(cv2.cvtColor(probe, cv2.COLOR_RGB2LAB)[..., 0]))


def lift_dark(rgb: np.ndarray, bar: float) -> np.ndarray:
    """The photo as the network should see it: when its median lightness is below ``bar``
    (0: never), brightened by a gamma curve to TARGET_LIGHTNESS and locally equalised
    (CLAHE on the lightness, hues kept); otherwise ``rgb`` itself. RGB uint8 in and out."""
    if bar <= 0:
        return rgb
    med = lightness(rgb)
    if med >= bar:
        return rgb
    gamma = np.log(TARGET_LIGHTNESS / 255.0) / np.log(max(med, 1.0) / 255.0)
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)
    lab = cv2.cvtColor(lut[rgb], cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
