"""RANSAC verification on synthetic correspondences with a known transform."""
import numpy as np

from delf_common.features import encode_array
from delf_verifier.ransac import box_corners, project, rank, verify
from delf_verifier.tasks import verify_candidates

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


def test_ranking_order():
    ms = [
        {"image_id": "u1", "votes": 50, "inliers": 5, "verified": False},
        {"image_id": "v1", "votes": 10, "inliers": 30, "verified": True},
        {"image_id": "v2", "votes": 40, "inliers": 30, "verified": True},
        {"image_id": "v3", "votes": 5, "inliers": 80, "verified": True},
        {"image_id": "u2", "votes": 70, "inliers": 9, "verified": False},
    ]
    assert [m["image_id"] for m in rank(ms)] == ["v3", "v2", "v1", "u2", "u1"]


def test_task_contract():
    q, d, _ = _pairs(seed=6)
    rng = np.random.default_rng(7)
    noise_db = rng.uniform([0, 0], [W, H], (len(q), 2)).astype(np.float32)
    idx = np.arange(len(q), dtype=np.int32)
    cands = [
        {"image_id": "noise", "votes": 99, "metadata": {}, "width": W, "height": H,
         "query_idx": encode_array(idx), "db_xy": encode_array(noise_db)},
        {"image_id": "match", "votes": 20, "metadata": {}, "width": W, "height": H,
         "query_idx": encode_array(idx[::-1].copy()), "db_xy": encode_array(d[::-1].copy())},
    ]
    query = {"locations": encode_array(q), "image_size": [W, H], "box": None}
    res = verify_candidates(query, cands, {"min_inliers": 12, "ransac_px": 8.0})
    assert res["ok"]
    m = res["matches"]
    assert [x["image_id"] for x in m] == ["match", "noise"]
    assert m[0]["verified"] and len(m[0]["transform"]) == 9 and len(m[0]["corners"]) == 4
    assert not m[1]["verified"] and m[1]["transform"] == [] and m[1]["corners"] == []
    bad = dict(cands[0], query_idx=encode_array(np.array([len(q) + 5] * len(q), np.int32)))
    assert verify_candidates(query, [bad], {})["error"]["code"] == "INVALID_ARGUMENT"


def _multiscale_pairs(seed, h=H_TRUE, n_fine=60, n_coarse=240, n_out=200):
    """Correspondences as DELF gives them: a few from fine pyramid levels (scale 0.71,
    ~1.5 px noise), many from coarse ones (scale 4, ~10 px noise and a shared offset:
    coarse cells locate a feature poorly), and random outliers."""
    rng = np.random.default_rng(seed)
    q = rng.uniform([0, 0], [W, H], (n_fine + n_coarse + n_out, 2))
    d = project(h, q)
    scale = np.concatenate([np.full(n_fine, 0.71), np.full(n_coarse, 4.0), rng.choice([0.71, 4.0], n_out)])
    d[:n_fine] += rng.normal(0, 1.5, (n_fine, 2))
    d[n_fine:n_fine + n_coarse] += rng.normal(0, 7.0, (n_coarse, 2)) + [5.0, -4.0]
    d[n_fine + n_coarse:] = rng.uniform([0, 0], [W, H], (n_out, 2))
    return q.astype(np.float32), d.astype(np.float32), scale.astype(np.float32)


def test_scales_refine_the_transform_but_not_the_score():
    want = project(H_TRUE, box_corners((W, H)))
    plain, refined = [], []
    for seed in range(5):
        q, d, s = _multiscale_pairs(seed)
        a = verify(q, d, (W, H), ransac_px=8.0)
        b = verify(q, d, (W, H), ransac_px=8.0, query_scale=s, db_scale=s)
        assert a.verified and b.verified and b.model == a.model == "homography"
        assert b.inliers == a.inliers  # the ranking stays RANSAC's
        plain.append(np.abs(np.array(a.corners) - want).max())
        refined.append(np.abs(np.array(b.corners) - want).max())
        assert np.allclose(project(np.array(b.transform).reshape(3, 3), box_corners((W, H))), b.corners)
    # the fine correspondences dominate: corners several times closer
    assert max(refined) < 4.0, refined
    assert np.median(refined) < 0.5 * np.median(plain), (plain, refined)


def test_scales_refine_an_affine_fit():
    a = np.array([[1.1, 0.1, 30.0], [-0.1, 0.95, 12.0], [0, 0, 1]])
    q, d, s = _multiscale_pairs(3, h=a, n_fine=3, n_coarse=4, n_out=0)
    v = verify(q, d, (W, H), min_inliers=5, ransac_px=8.0, query_scale=s, db_scale=s)
    assert v.verified and v.model == "affine"
    assert np.allclose(np.array(v.transform).reshape(3, 3)[2], [0, 0, 1])


def test_task_uses_scales_when_both_sides_send_them():
    q, d, s = _multiscale_pairs(11)
    idx = np.arange(len(q), dtype=np.int32)
    cand = {"image_id": "m", "votes": 9, "query_idx": encode_array(idx), "db_xy": encode_array(d)}
    query = {"locations": encode_array(q), "image_size": [W, H], "box": None}
    want = project(H_TRUE, box_corners((W, H)))
    opts = {"min_inliers": 12, "ransac_px": 8.0}

    def err(query, cand):
        res = verify_candidates(query, [cand], opts)
        assert res["ok"], res
        return np.abs(np.array(res["matches"][0]["corners"]) - want).max()

    with_scales = err(dict(query, scales=encode_array(s)), dict(cand, db_scale=encode_array(s)))
    assert with_scales < 4.0 and with_scales < err(query, cand)
    # only one side: RANSAC's transform, as before
    assert err(dict(query, scales=encode_array(s)), cand) == err(query, cand)
    short = dict(query, scales=encode_array(s[:-1]))
    assert verify_candidates(short, [cand], opts)["error"]["code"] == "INVALID_ARGUMENT"
    bad = dict(cand, db_scale=encode_array(s[:5]))
    assert verify_candidates(query | {"scales": encode_array(s)}, [bad], opts)["error"]["code"] == \
        "INVALID_ARGUMENT"
