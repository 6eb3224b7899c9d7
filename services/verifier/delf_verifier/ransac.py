"""Geometric verification: fit a query -> database transform to the correspondences.

OpenCV's USAC-MAGSAC++ homography (maxIters 1000 like the reference's RANSAC,
confidence 0.999, OpenCV's RNG seeded per call so results are deterministic), with
a fall back to a RANSAC affine fit (``cv2.estimateAffine2D``) when there are fewer
than 8 correspondences (a homography from 4-7 points is too easily fitted to
noise) or when the homography is degenerate: ill-conditioned, mirroring (negative
determinant of its linear part), extreme scale change, or mapping the query box
to a non-convex / folded quadrilateral.

``verify`` fits the plane model; ``judge`` scores a candidate with the shared ranking score
of its votes and inliers (``delf_common.ranking``) and gives the region only to a verified
match. ``fit_epipolar`` (a fundamental matrix, for non-planar scenes) is measured by
``scripts/bench_accuracy.py`` and not used by the ranking: on landmarks-dev it added nothing
to votes and plane inliers (BENCHMARKS.md, "Right on the hard photos").

When the keypoints' scales are known (DELF features: 1 / pyramid scale, so a feature's
location is only as precise as its level's cell), the verified transform is refined:
RANSAC treats a correspondence between two 1.41-level cells (11 px) like one between two
0.25-level cells (64 px), and the transform it returns is pulled by the coarse ones.
``refine`` re-selects the correspondences within ``ransac_px`` x sqrt(sq^2 + sd^2) of the
model (a threshold that grows with the cells' size) and refits them by least squares
weighted by 1 / (sq^2 + sd^2), a few rounds. Inlier counts, and so the ranking, stay
RANSAC's; the transform and corners are the refined ones. On 54 warped photos the corner
error fell from 5.6 px median / 35 px max to 4.7 / 12 px (BENCHMARKS.md, "Region corners").
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from delf_common.ranking import match_score, rank_matches

MIN_HOMOGRAPHY_POINTS = 8
MIN_REGION_INLIERS = 12  # fewer plane inliers give no region, however well the photo scores
FUNDAMENTAL_POINTS = 15  # a 7-point model on fewer is fitted to noise
MAX_ITERS = 1000
CONFIDENCE = 0.999
SEED = 1234
MAX_SCALE_CHANGE = 20.0  # larger zoom between query and database is treated as degenerate
REFINE_ROUNDS = 4
LM_ITERS = 10


@dataclasses.dataclass
class Verification:
    inliers: int
    verified: bool
    transform: list[float]            # 9 floats, row-major; [] when unverified
    corners: list[list[float]]        # [[x, y]] x 4 (TL, TR, BR, BL); [] when unverified
    model: str = ""                   # "homography" | "affine" | ""
    inlier_mask: np.ndarray | None = None  # (M,) bool: RANSAC's inliers; None when no model was fitted


def box_corners(image_size, box=None) -> np.ndarray:
    """(4, 2) corners TL, TR, BR, BL of the box (x0, y0, x1, y1) or of the whole image."""
    if box is None:
        w, h = image_size
        x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    else:
        x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    p = np.hstack([pts, np.ones((len(pts), 1))]) @ np.asarray(h, np.float64).T
    return p[:, :2] / p[:, 2:3]


def _is_convex_quad(q: np.ndarray) -> bool:
    cross = []
    for i in range(4):
        a, b, c = q[i], q[(i + 1) % 4], q[(i + 2) % 4]
        ab, bc = b - a, c - b
        cross.append(ab[0] * bc[1] - ab[1] * bc[0])
    cross = np.array(cross)
    return bool(np.all(cross > 0) or np.all(cross < 0))


def homography_ok(h: np.ndarray | None, corners: np.ndarray) -> bool:
    """A plausible query -> database homography: finite, orientation-preserving,
    well conditioned, bounded zoom, and the mapped box a convex quadrilateral in
    the same winding (no point of the box sent to infinity)."""
    if h is None or h.shape != (3, 3) or not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-12:
        return False
    h = h / h[2, 2]
    a = h[:2, :2]
    det = float(np.linalg.det(a))
    if det <= 0:
        return False
    sv = np.linalg.svd(a, compute_uv=False)
    if sv[-1] <= 0 or sv[0] / sv[-1] > 10.0:
        return False
    if not (1.0 / MAX_SCALE_CHANGE ** 2 < det < MAX_SCALE_CHANGE ** 2):
        return False
    w = np.hstack([corners, np.ones((4, 1))]) @ h[2]
    if np.any(w <= 1e-6):  # the box crosses the line sent to infinity
        return False
    q = project(h, corners)
    if not np.all(np.isfinite(q)) or not _is_convex_quad(q):
        return False
    # Same winding as the box (orientation kept).
    return _signed_area(q) * _signed_area(corners) > 0


def _signed_area(q: np.ndarray) -> float:
    x, y = q[:, 0], q[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def affine_ok(m: np.ndarray | None) -> bool:
    if m is None or not np.all(np.isfinite(m)):
        return False
    a = m[:2, :2]
    det = float(np.linalg.det(a))
    if det <= 0 or not (1.0 / MAX_SCALE_CHANGE ** 2 < det < MAX_SCALE_CHANGE ** 2):
        return False
    sv = np.linalg.svd(a, compute_uv=False)
    return sv[-1] > 0 and sv[0] / sv[-1] <= 10.0


def _normaliser(p: np.ndarray) -> np.ndarray:
    """Hartley normalisation: centroid to the origin, mean distance sqrt(2)."""
    c = p.mean(0)
    spread = float(np.sqrt(((p - c) ** 2).sum(1)).mean())
    k = np.sqrt(2.0) / spread if spread > 1e-9 else 1.0
    return np.array([[k, 0.0, -k * c[0]], [0.0, k, -k * c[1]], [0.0, 0.0, 1.0]])


def _weighted_affine(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """3x3 affine minimising sum w |A src - dst|^2 (closed form)."""
    sw = np.sqrt(w)[:, None]
    a = np.hstack([src, np.ones((len(src), 1))]) * sw
    sol, *_ = np.linalg.lstsq(a, dst * sw, rcond=None)  # (3, 2)
    if not np.all(np.isfinite(sol)):
        return None
    return np.vstack([sol.T, [0.0, 0.0, 1.0]])


def _weighted_homography(h0: np.ndarray, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """Homography minimising sum w |H(src) - dst|^2, Levenberg-Marquardt from h0 on
    normalised coordinates."""
    ts, td = _normaliser(src), _normaliser(dst)
    s, d = project(ts, src), project(td, dst)
    h = td @ h0 @ np.linalg.inv(ts)
    if abs(h[2, 2]) < 1e-12:
        return None
    p = (h / h[2, 2]).reshape(9)[:8].copy()
    sw = np.sqrt(w / w.mean())
    x, y = s[:, 0], s[:, 1]

    def residual(p):
        u = p[0] * x + p[1] * y + p[2]
        v = p[3] * x + p[4] * y + p[5]
        z = p[6] * x + p[7] * y + 1.0
        return u, v, z, np.concatenate([(u / z - d[:, 0]) * sw, (v / z - d[:, 1]) * sw])

    u, v, z, r = residual(p)
    cost, lam = float(r @ r), 1e-3
    for _ in range(LM_ITERS):
        if np.any(np.abs(z) < 1e-9):
            return None
        pu, pv = u / z, v / z
        jx = np.stack([x / z, y / z, 1 / z, 0 * x, 0 * x, 0 * x, -pu * x / z, -pu * y / z], 1) * sw[:, None]
        jy = np.stack([0 * x, 0 * x, 0 * x, x / z, y / z, 1 / z, -pv * x / z, -pv * y / z], 1) * sw[:, None]
        j = np.vstack([jx, jy])
        a, g = j.T @ j, j.T @ r
        improved = False
        for _ in range(8):
            try:
                step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
            except np.linalg.LinAlgError:
                return None
            u2, v2, z2, r2 = residual(p + step)
            c2 = float(r2 @ r2)
            if np.isfinite(c2) and c2 < cost:
                p, u, v, z, r, lam, improved = p + step, u2, v2, z2, r2, lam / 10, True
                gain, cost = cost - c2, c2
                break
            lam *= 10
        if not improved or gain < 1e-12 * max(cost, 1e-12):
            break
    h = np.linalg.inv(td) @ np.append(p, 1.0).reshape(3, 3) @ ts
    return h / h[2, 2] if np.all(np.isfinite(h)) and abs(h[2, 2]) > 1e-12 else None


def refine(h: np.ndarray, model: str, src: np.ndarray, dst: np.ndarray, query_scale: np.ndarray,
           db_scale: np.ndarray, ransac_px: float, corners: np.ndarray) -> np.ndarray:
    """The transform refitted with scale-aware thresholds and weights (module docstring);
    ``h`` itself when a round has too few points or gives an implausible transform."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    var = np.asarray(query_scale, np.float64) ** 2 + np.asarray(db_scale, np.float64) ** 2
    if not np.all(np.isfinite(var)) or np.any(var <= 0):
        return h
    bar = ransac_px * np.sqrt(var)
    need = MIN_HOMOGRAPHY_POINTS if model == "homography" else 3
    for _ in range(REFINE_ROUNDS):
        keep = np.linalg.norm(project(h, src) - dst, axis=1) < bar
        if int(keep.sum()) < need:
            break
        if model == "homography":
            new = _weighted_homography(h, src[keep], dst[keep], 1.0 / var[keep])
            ok = new is not None and homography_ok(new, corners)
        else:
            new = _weighted_affine(src[keep], dst[keep], 1.0 / var[keep])
            ok = new is not None and affine_ok(new)
        if not ok:
            break
        h = new
    return h


def fit_plane(src: np.ndarray, dst: np.ndarray, corners: np.ndarray, ransac_px: float):
    """(transform 3x3, "homography" | "affine", inlier mask (M,) bool) of the plausible plane
    model RANSAC finds, or (None, "", None)."""
    n = len(src)
    if n < 3:
        return None, "", None
    cv2.setRNGSeed(SEED)
    if n >= MIN_HOMOGRAPHY_POINTS:
        hh, m = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, ransac_px,
                                   maxIters=MAX_ITERS, confidence=CONFIDENCE)
        if hh is not None and m is not None and homography_ok(hh, corners):
            return hh / hh[2, 2], "homography", np.asarray(m).reshape(-1) != 0
    cv2.setRNGSeed(SEED)
    aa, m = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_px,
                                 maxIters=MAX_ITERS, confidence=CONFIDENCE, refineIters=10)
    if aa is not None and m is not None and affine_ok(aa):
        return np.vstack([aa, [0.0, 0.0, 1.0]]), "affine", np.asarray(m).reshape(-1) != 0
    return None, "", None


def fit_epipolar(src: np.ndarray, dst: np.ndarray, px: float) -> np.ndarray | None:
    """Inlier mask (M,) bool of a fundamental matrix (USAC-MAGSAC++, ``px`` from the epipolar
    line) over the correspondences: the geometry of two views of any rigid scene, planar or
    not; None with fewer than FUNDAMENTAL_POINTS correspondences or no model."""
    if len(src) < FUNDAMENTAL_POINTS:
        return None
    cv2.setRNGSeed(SEED)
    try:
        f, m = cv2.findFundamentalMat(src, dst, cv2.USAC_MAGSAC, px, CONFIDENCE, MAX_ITERS)
    except cv2.error:
        return None
    if f is None or m is None or f.shape != (3, 3):
        return None
    return np.asarray(m).reshape(-1) != 0


def verify(query_xy: np.ndarray, db_xy: np.ndarray, image_size, box=None,
           min_inliers: int = 25, ransac_px: float = 8.0, min_inlier_ratio: float = 0.0,
           query_scale: np.ndarray | None = None, db_scale: np.ndarray | None = None) -> Verification:
    """Fit query -> database on corresponding points (both (M, 2)): the geometry alone.

    ``verified`` here means the plane model has at least ``min_inliers`` inliers and
    ``min_inlier_ratio`` times the correspondences (then the transform and corners are
    given); a search result's ``verified`` is ``judge``'s, from the shared score.
    query_scale, db_scale: (M,) the keypoints' scales (DELF: 1 / pyramid scale); given
    both, a verified transform is refined (``refine``).
    """
    src = np.ascontiguousarray(query_xy, np.float32).reshape(-1, 2)
    dst = np.ascontiguousarray(db_xy, np.float32).reshape(-1, 2)
    n = len(src)
    corners = box_corners(image_size, box)
    h, model, mask = fit_plane(src, dst, corners, ransac_px)
    if h is None:
        return Verification(0, False, [], [])
    inliers = int(np.count_nonzero(mask))
    if inliers < min_inliers or inliers < min_inlier_ratio * n:
        return Verification(inliers, False, [], [], model, mask)
    if query_scale is not None and db_scale is not None:
        qs = np.asarray(query_scale, np.float64).reshape(-1)
        ds = np.asarray(db_scale, np.float64).reshape(-1)
        if len(qs) == n and len(ds) == n:
            h = refine(h, model, src, dst, qs, ds, ransac_px, corners)
    return Verification(
        inliers, True,
        [float(v) for v in h.reshape(9)],
        [[float(x), float(y)] for x, y in project(h, corners)],
        model,
        mask,
    )


def judge(query_xy: np.ndarray, db_xy: np.ndarray, image_size, box, votes: int,
          verified_score: float, ransac_px: float = 8.0,
          query_scale: np.ndarray | None = None, db_scale: np.ndarray | None = None) -> Verification:
    """One candidate's verdict: the plane model's inliers (``verify``), the shared score of
    its votes and inliers (``delf_common.ranking.match_score``) and verified when the score
    reaches ``verified_score``. A verified match with at least MIN_REGION_INLIERS inliers
    also gets the (refined) transform and the query region's corners; the inlier mask is
    kept either way (which correspondences RANSAC kept is data; what a picture draws is the
    drawer's choice)."""
    v = verify(query_xy, db_xy, image_size, box, min_inliers=MIN_REGION_INLIERS, ransac_px=ransac_px,
               query_scale=query_scale, db_scale=db_scale)
    verified = match_score(votes, v.inliers) >= verified_score
    if verified and v.verified:
        return v
    return Verification(v.inliers, verified, [], [], v.model, v.inlier_mask)


# The result order is shared with the gateway, which merges the verifiers' chunks.
rank = rank_matches
