"""Measured quality of the DELF extractor on real photos (scikit-image samples, so it runs anywhere).

1. Equivalence: the fast path (`extract_batch`: several photos, equal sizes share each
   level's forward pass) against a straightforward fp32 path (`extract`, one photo at a
   time): at least 95% of keypoints identical (same location within 1e-3 px and same
   scale) and descriptor cosine >= 0.99 for those. The CUDA-only switches of the fast
   path (channels_last, bf16 autocast) are exercised on the CPU too and their agreement
   is printed; channels_last is asserted to the same floors, bf16 to looser ones (the
   keypoint *ranking* under bf16 is what moves, see test docstring).
2. Repeatability under a known homography (`photos.warped_query`): the query's keypoints
   projected into the original land near a keypoint of the original, and their nearest
   descriptor in the original is one of those nearby keypoints.

Run with ``-s`` to see the figures.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from delf_common.features import DelfFeatures
from delf_extractor.extract import DelfExtractor
from photos import map_points, sample_photo, warped_query

STRIDE = 16  # feature stride of the shipped presets' feature layer, in level pixels

# ----------------------------------------------------------------------------- helpers


def keypoint_agreement(ref: DelfFeatures, fast: DelfFeatures, tol: float = 1e-3) -> tuple[float, float, float]:
    """(fraction identical, min cosine, mean cosine) of the keypoints of two extractions.

    A keypoint is identical when the other extraction has one at the same location
    (within ``tol`` px) and the same scale; the fraction is over the larger of the two
    sets, so a missing or an extra keypoint both count against it. Cosines are of the
    identical keypoints' (unit) descriptors.
    """
    if len(ref) == 0 and len(fast) == 0:
        return 1.0, 1.0, 1.0
    d = np.abs(ref.locations[:, None, :] - fast.locations[None, :, :]).max(2)
    same = (d <= tol) & np.isclose(ref.scales[:, None], fast.scales[None, :], rtol=1e-6)
    i, j = np.nonzero(same)
    # cells are unique per (location, scale) within one extraction, so matches are 1:1
    frac = len(i) / max(len(ref), len(fast))
    if len(i) == 0:
        return frac, float("nan"), float("nan")
    cos = np.sum(ref.descriptors[i] * fast.descriptors[j], axis=1)
    return frac, float(cos.min()), float(cos.mean())


def local_scale(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """sqrt(|det J|) of the homography at each point: how much it magnifies there."""
    p0, px, py = (map_points(H, pts + off) for off in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0]))
    jac = np.stack([px - p0, py - p0], axis=2)
    return np.sqrt(np.abs(np.linalg.det(jac)))


def repeatability(orig: DelfFeatures, query: DelfFeatures, H: np.ndarray,
                  size: tuple[int, int]) -> dict[str, float]:
    """Repeatability of `query`'s keypoints in `orig` under H (query pixels -> orig pixels).

    For a query keypoint at scale s (1 / pyramid level, in query pixels), its projection p
    has scale s' = s * local_scale(H) in the original's pixels: the level of the original
    that sees the same structure at the same cell size. Its radius is one feature stride of
    that level, r = 16 * s' original pixels (the spacing of that level's cells, so a
    keypoint of the original's matching level is always within about r / sqrt(2) of a
    perfectly repeated one).

    a (repeated): fraction of the query keypoints projecting inside the original whose
      projection has a keypoint of the original within r whose scale is within one
      pyramid step (a factor sqrt(2)) of s'.
    b (matched): among the repeated ones, the fraction whose nearest descriptor (cosine)
      in the whole original lies within r of the projection (the nearby keypoint, or
      another one within the same radius, at any scale).
    """
    w, h = size
    p = map_points(H, query.locations)
    inside = (p[:, 0] >= 0) & (p[:, 0] <= w - 1) & (p[:, 1] >= 0) & (p[:, 1] <= h - 1)
    s_proj = query.scales * local_scale(H, query.locations)
    radius = STRIDE * s_proj
    dist = np.linalg.norm(p[:, None, :] - orig.locations[None, :, :], axis=2)
    ratio = orig.scales[None, :] / s_proj[:, None]
    near = (dist <= radius[:, None]) & (ratio >= 2 ** -0.5 - 1e-6) & (ratio <= 2 ** 0.5 + 1e-6)
    repeated = near.any(1) & inside
    nn_idx = np.argmax(query.descriptors @ orig.descriptors.T, axis=1)
    matched = dist[np.arange(len(nn_idx)), nn_idx] <= radius
    n_rep = int(repeated.sum())
    return {
        "inside": float(inside.mean()),
        "a": n_rep / max(int(inside.sum()), 1),
        "b": float(matched[repeated].mean()) if n_rep else 0.0,
    }


def rotated_180(H: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A wrong ground truth for a control: H followed by a half turn about the original's centre."""
    w, h = size
    return np.array([[-1.0, 0, w - 1], [0, -1.0, h - 1], [0, 0, 1]]) @ H


class _CpuFastPathNet(nn.Module):
    """The network as the CUDA branch of `_extract_same_size` runs it (channels_last input
    and weights, optionally bf16 autocast), made to run on the CPU."""

    def __init__(self, net: nn.Module, bf16: bool):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)
        self.bf16 = bf16

    def forward(self, x: torch.Tensor):
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.net(x)

    def geometry(self, height: int, width: int):
        return self.net.geometry(height, width)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def extractor() -> DelfExtractor:
    return DelfExtractor("effnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Six real photos in three same-size pairs, so `extract_batch` really batches."""
    astronaut, ihc = sample_photo("astronaut"), sample_photo("immunohistochemistry")  # 512 x 512
    coffee = sample_photo("coffee")  # 400 x 600
    rocket = np.ascontiguousarray(sample_photo("rocket")[:400, :600])
    chelsea = sample_photo("chelsea")  # 300 x 451
    moto = np.ascontiguousarray(sample_photo("motorcycle")[100:400, 100:551])
    return [astronaut, coffee, chelsea, ihc, rocket, moto]


@pytest.fixture(scope="module")
def reference(extractor, photos) -> list[DelfFeatures]:
    """The straightforward path: fp32, contiguous, one photo at a time."""
    return [extractor.extract(rgb) for rgb in photos]


# ----------------------------------------------------------------------------- 1. equivalence


def _report(label: str, rows: list[tuple[float, float, float]]) -> None:
    fr = [r[0] for r in rows]
    print(f"\n{label}: identical keypoints min {min(fr):.4f} mean {np.mean(fr):.4f}; "
          f"cosine min {min(r[1] for r in rows):.5f} mean {np.mean([r[2] for r in rows]):.5f}")


def test_batched_fast_path_matches_one_at_a_time_fp32(extractor, photos, reference):
    """The CPU default fast path: `extract_batch` over the six photos (three same-size pairs)."""
    t = time.perf_counter()
    batched = extractor.extract_batch(photos)
    dt = time.perf_counter() - t
    rows = [keypoint_agreement(ref, fb) for ref, fb in zip(reference, batched)]
    _report(f"extract_batch (CPU default, fp32) vs extract, {len(photos)} photos in {dt:.1f} s", rows)
    for ref, fb, (frac, cos_min, _) in zip(reference, batched, rows):
        assert len(ref) > 100 and len(fb) > 100
        assert frac >= 0.95
        assert cos_min >= 0.99


def test_channels_last_on_cpu_matches_one_at_a_time_fp32(photos, reference):
    """channels_last (the CUDA branch's memory format) on the CPU, batched: same floors."""
    ext = DelfExtractor("effnet-lite0", device="cpu")
    ext.net = _CpuFastPathNet(ext.net, bf16=False)
    rows = [keypoint_agreement(ref, fb) for ref, fb in zip(reference, ext.extract_batch(photos))]
    _report("channels_last fp32, batched vs extract", rows)
    for frac, cos_min, _ in rows:
        assert frac >= 0.95
        assert cos_min >= 0.99


@pytest.mark.skipif(not hasattr(torch, "autocast"), reason="no torch.autocast")
def test_bf16_autocast_on_cpu_agreement(photos, reference):
    """bf16 autocast + channels_last (what runs on CUDA) emulated on the CPU, batched.

    Reported, with looser floors: bf16 perturbs the feature norms that rank the cells, so
    a few cells near the top-1000 cut swap in or out, and single descriptors can dip to a
    cosine of about 0.99. The issue's floors are asserted for the CPU default path (fp32)
    above; CPU bf16 kernels differ from cuDNN's, so this is only a proxy for the GPU path.
    """
    ext = DelfExtractor("effnet-lite0", device="cpu")
    ext.net = _CpuFastPathNet(ext.net, bf16=True)
    t = time.perf_counter()
    try:
        out = ext.extract_batch(photos)
    except RuntimeError as e:  # an old CPU / build without bf16 kernels
        pytest.skip(f"bf16 autocast does not run on this CPU: {e}")
    dt = time.perf_counter() - t
    rows = [keypoint_agreement(ref, fb) for ref, fb in zip(reference, out)]
    _report(f"bf16 autocast + channels_last, batched vs fp32 extract ({dt:.1f} s)", rows)
    # measured on the 2-core dev CPU: identical 0.98-0.99, cosine min 0.99, mean 0.999
    for frac, _, mean_cos in rows:
        assert frac >= 0.90
        assert mean_cos >= 0.99


# ----------------------------------------------------------------------------- 2. repeatability

# Measured (effnet-lite0 defaults, seeds 0-2, astronaut/chelsea/coffee/rocket): a 0.91-0.96,
# b 0.63-0.93 (rocket lowest: its sky and smoke give many look-alike cells). With a wrong H
# (the 180-degree control) b drops to 0.00-0.05 but a stays at 0.5-0.86: 1000 keypoints over
# six levels cover a small photo densely, so (a) alone says little; (b) is the informative one.
REPEAT_PHOTOS = ["astronaut", "chelsea", "rocket"]


@pytest.mark.parametrize("name", REPEAT_PHOTOS)
def test_repeatability_under_known_homography(extractor, name):
    rgb = sample_photo(name)
    query, H = warped_query(rgb, seed=0)
    size = (rgb.shape[1], rgb.shape[0])
    t = time.perf_counter()
    f0, fq = extractor.extract(rgb), extractor.extract(query)
    dt = time.perf_counter() - t
    r = repeatability(f0, fq, H, size)
    ctrl = repeatability(f0, fq, rotated_180(H, size), size)
    print(f"\n{name}: {len(fq)} query keypoints, {r['inside']:.2f} project inside; "
          f"repeated (a) {r['a']:.3f}, matched (b) {r['b']:.3f}; "
          f"control with a wrong H: a {ctrl['a']:.3f} b {ctrl['b']:.3f}; {dt:.1f} s")
    assert len(f0) == len(fq) == extractor.cfg.max_features
    assert r["inside"] >= 0.9
    assert r["a"] >= 0.75        # measured 0.91-0.96
    assert r["b"] >= 0.45        # measured 0.63 (rocket) - 0.93
    assert ctrl["b"] <= 0.25     # descriptors do not match at the wrong place
    assert r["b"] >= ctrl["b"] + 0.3
    assert r["a"] > ctrl["a"]
