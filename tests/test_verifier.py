"""RANSAC verification on synthetic correspondences with a known transform."""
import numpy as np

from delf_common.ranking import match_score
from delf_verifier.ransac import box_corners, judge, project, rank, verify

W, H = 800, 600
H_TRUE = np.array([[0.9, 0.08, 40.0], [-0.05, 1.05, 25.0], [2e-4, -1e-4, 1.0]])


def _pairs(n=200, outlier_frac=0.5, noise=2.0, seed=0, h=H_TRUE):
    rng = np.random.default_rng(seed)
    q = rng.uniform([0, 0], [W, H], (n, 2))
    d = project(h, q) + rng.normal(0, noise, (n, 2))
    out = rng.random(n) < outlier_frac
    d[out] = rng.uniform([0, 0], [W, H], (int(out.sum()), 2))
    return q.astype(np.float32), d.astype(np.float32), out


def test_homography_recovered_with_half_outliers():
    q, d, out = _pairs()
    v = verify(q, d, (W, H), min_inliers=12, ransac_px=8.0)
    assert v.verified and v.model == "homography"
    assert abs(v.inliers - int((~out).sum())) <= 10
    corners = np.array(v.corners)
    want = project(H_TRUE, box_corners((W, H)))
    assert np.abs(corners - want).max() < 3.0
    assert len(v.transform) == 9 and abs(v.transform[8] - 1.0) < 1e-9


def test_box_corners_are_mapped():
    q, d, _ = _pairs(seed=1)
    box = (100, 50, 400, 300)
    v = verify(q, d, (W, H), box=box, ransac_px=8.0)
    want = project(H_TRUE, box_corners((W, H), box))
    assert np.abs(np.array(v.corners) - want).max() < 3.0
    # TL, TR, BR, BL order
    c = np.array(v.corners)
    assert c[0, 0] < c[1, 0] and c[1, 1] < c[2, 1] and c[3, 0] < c[2, 0]


def test_deterministic():
    q, d, _ = _pairs(seed=2)
    a = verify(q, d, (W, H))
    b = verify(q, d, (W, H))
    assert a.inliers == b.inliers and a.transform == b.transform


def test_pure_outliers_unverified():
    rng = np.random.default_rng(3)
    q = rng.uniform([0, 0], [W, H], (150, 2)).astype(np.float32)
    d = rng.uniform([0, 0], [W, H], (150, 2)).astype(np.float32)
    v = verify(q, d, (W, H), min_inliers=12, ransac_px=16.0)
    assert not v.verified
    assert v.transform == [] and v.corners == []


def test_few_inliers_among_many_correspondences_are_not_verified():
    # 60 true matches drowned in 570 random ones: enough inliers in absolute terms,
    # too small a share to trust (what chance inliers of an unrelated photo look like).
    q, d, out = _pairs(n=630, outlier_frac=570 / 630, seed=5)
    lenient = verify(q, d, (W, H), min_inliers=20, ransac_px=8.0)
    strict = verify(q, d, (W, H), min_inliers=20, ransac_px=8.0, min_inlier_ratio=0.15)
    assert lenient.inliers >= 20 and lenient.verified
    assert strict.inliers == lenient.inliers and not strict.verified
    assert strict.transform == [] and strict.corners == []


def test_affine_fallback_with_few_points():
    a = np.array([[1.1, 0.1, 30.0], [-0.1, 0.95, 12.0], [0, 0, 1]])
    q, d, _ = _pairs(n=6, outlier_frac=0.0, noise=0.5, seed=4, h=a)
    v = verify(q, d, (W, H), min_inliers=5, ransac_px=4.0)
    assert v.verified and v.model == "affine" and v.inliers == 6
    t = np.array(v.transform).reshape(3, 3)
    assert np.allclose(t[2], [0, 0, 1])
    assert np.abs(np.array(v.corners) - project(a, box_corners((W, H)))).max() < 3.0


def test_mirrored_homography_is_rejected():
    flip = np.array([[-1.0, 0, W], [0, 1, 0], [0, 0, 1]])  # mirror image: not a real view
    q, d, _ = _pairs(n=100, outlier_frac=0.0, noise=0.5, seed=5, h=flip)
    v = verify(q, d, (W, H))
    assert not v.verified


def test_one_score_ranks_every_result():
    ms = [
        {"image_id": "few-votes-many-inliers", "votes": 5, "inliers": 80},
        {"image_id": "many-votes-no-plane", "votes": 300, "inliers": 0},
        {"image_id": "many-votes-many-inliers", "votes": 300, "inliers": 90},
        {"image_id": "some-votes", "votes": 40, "inliers": 30},
        {"image_id": "same-votes-fewer-inliers", "votes": 40, "inliers": 12},
    ]
    assert [m["image_id"] for m in rank(ms)] == [
        "many-votes-many-inliers", "many-votes-no-plane", "some-votes", "same-votes-fewer-inliers",
        "few-votes-many-inliers"]
    scores = [match_score(m["votes"], m["inliers"]) for m in rank(ms)]
    assert all(0.0 <= x <= 1.0 for x in scores) and scores == sorted(scores, reverse=True)


def test_score_never_falls_with_more_evidence():
    # No photo with more votes and more inliers ranks below one with fewer: no hidden gate.
    grid = [(v, i) for v in (0, 1, 5, 20, 60, 150, 400) for i in (0, 3, 12, 25, 27, 60, 200)]
    for v, i in grid:
        for v2, i2 in grid:
            if v2 >= v and i2 >= i:
                assert match_score(v2, i2) >= match_score(v, i), ((v, i), (v2, i2))


def test_verified_is_a_threshold_on_the_score():
    q, d, _ = _pairs(n=300, outlier_frac=0.3, seed=8)
    v_many = judge(q, d, (W, H), None, votes=250, verified_score=0.9)
    assert v_many.verified and match_score(250, v_many.inliers) >= 0.9
    assert len(v_many.transform) == 9 and len(v_many.corners) == 4
    v_few = judge(q, d, (W, H), None, votes=3, verified_score=0.9)
    assert v_few.inliers == v_many.inliers  # the same geometry ...
    assert not v_few.verified and v_few.corners == []  # ... below the bar: no region
    assert judge(q, d, (W, H), None, votes=3, verified_score=0.0).verified  # 0 is a value


