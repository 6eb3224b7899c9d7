#!/usr/bin/env python
"""Real distractors in the accuracy lab: how far each set falls when the other set's photos
join the collection, under other vote weights and ranking rules than the shipped ones.

The lab of ``bench_accuracy.py`` (its cached features, exact numpy kNN, the indexer's ratio
test, the verifier's plane model and fundamental matrix), each set searched alone and both
sets pooled (each the other's real distractors; the other set's photos of a place shown in
both are junk for its queries, as ``bench_accuracy.metrics`` counts them). Every
rule ranks the same shortlists; what it changes is the weight of a vote or the key:

* vote weights: every vote 1 (shipped); ``margin`` (1 - distance / the ratio bar); ``inv``
  (1 / the images that query descriptor votes for, tf-idf's idea within one row); ``rank``
  (1 / sqrt(1 + its neighbour's position));
* ``scale-consistent votes``: only the votes in the most common DELF scale ratio (one
  half-octave bin, or three), weak geometric consistency on scale;
* the score's inlier weight and a fundamental-matrix term, ln(1 + votes) + w ln(1 + plane
  inliers) + e ln(1 + epipolar inliers), over a grid.

    .venv/bin/python scripts/bench_distractor_rules.py [--cache /tmp/delf-accuracy] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_accuracy  # noqa: E402 - the lab's photos, cache and pooling

NEIGHBOURS, RATIO, SHORTLIST, RANSAC_PX = 7, 0.9, 100, 8.0
WEIGHTS = {
    "count": lambda d, bar, j, m: 1.0,
    "margin": lambda d, bar, j, m: 1.0 - d / bar,
    "inv": lambda d, bar, j, m: 1.0 / m,
    "rank": lambda d, bar, j, m: 1.0 / np.sqrt(1.0 + j),
}


def tally(dist: np.ndarray, rows: np.ndarray, owner: np.ndarray) -> tuple[dict, dict, dict]:
    """({weight: {image: weighted votes}}, {image: {query row: db row}} of the nearest
    fetched neighbour there, {image: [(query row, db row)] of the votes}); the ratio test and
    one vote per image and query row, as ``delf_indexer.voting``."""
    votes: dict = {w: {} for w in WEIGHTS}
    near: dict = {}
    pairs: dict = {}
    img = owner[rows]
    for qi in range(len(dist)):
        bar = RATIO * dist[qi, -1]
        seen: dict = {}
        for j in range(dist.shape[1]):
            near.setdefault(img[qi, j], {}).setdefault(qi, rows[qi, j])
            if j < NEIGHBOURS and dist[qi, j] < bar and img[qi, j] not in seen:
                seen[img[qi, j]] = (float(dist[qi, j]), j, rows[qi, j])
        for im, (d, j, row) in seen.items():
            pairs.setdefault(im, []).append((qi, row))
            for w, f in WEIGHTS.items():
                votes[w][im] = votes[w].get(im, 0.0) + f(d, bar, j, len(seen))
    return votes, near, pairs


def shortlists(feats: dict) -> dict:
    """{weight: {query: [candidate rows]}}, each weight's own shortlist verified."""
    from delf_tools.eval_local import ExactVoter
    from delf_tools.evaluation import queries_and_positives
    voter = ExactVoter({i: f[2] for i, f in feats.items()})
    scale = np.concatenate([f[2].scale for f in feats.values()]).astype(np.float32)
    out: dict = {w: {} for w in WEIGHTS}
    for q in queries_and_positives({i: f[0] for i, f in feats.items()}):
        f = feats[q][2]
        dist, rows = voter.knn(np.ascontiguousarray(f.desc, np.float32), NEIGHBOURS + 1, q)
        votes, near, pairs = tally(dist, rows, voter.owner)
        cache: dict = {}
        for w, v in votes.items():
            ranked = sorted(v, key=lambda i: (-v[i], i))[:SHORTLIST]
            for im in ranked:
                if im not in cache:
                    cache[im] = _geometry(f, near[im], pairs[im], voter, scale)
            out[w][q] = [dict(cache[im], votes=votes["count"][im], w=v[im]) for im in ranked]
    return out


def _geometry(f, near: dict, pairs: list, voter, scale: np.ndarray) -> dict:
    """One candidate's plane inliers, epipolar inliers and scale-consistent votes."""
    from delf_verifier.ransac import box_corners, fit_epipolar, fit_plane

    qi = np.array(sorted(near))
    db = np.array([near[k] for k in qi])
    src = np.ascontiguousarray(f.xy[qi], np.float32)
    dst = np.ascontiguousarray(voter.xy[db].reshape(-1, 2), np.float32)
    _, _, mask = fit_plane(src, dst, box_corners(f.size), RANSAC_PX)
    epi = fit_epipolar(src, dst, RANSAC_PX)
    vp = np.array(pairs)
    bins = np.round(2 * np.log2(scale[vp[:, 1]] / f.scale[vp[:, 0]])).astype(int)
    counts = np.bincount(bins - bins.min())
    return {"image_id": voter.names[voter.owner[db[0]]], "inliers": int(mask.sum()) if mask is not None else 0,
            "epi": int(epi.sum()) if epi is not None else 0, "scale1": int(counts.max()),
            "scale3": int(np.convolve(counts, [1, 1, 1], "same").max())}


def rules() -> dict:
    """{name: (vote weight, key)}."""
    out = {"shipped: ln(1+votes) + 0.1 ln(1+inliers)": ("count", _score(0.1, 0.0))}
    for w in ("margin", "inv", "rank"):
        out[f"votes weighted by {w}, + 0.1 ln(1+inliers)"] = (w, _score(0.1, 0.0))
    out["scale-consistent votes (1 bin)"] = ("count", lambda r: r["scale1"])
    out["scale-consistent votes (3 bins)"] = ("count", lambda r: r["scale3"])
    for iw in (0.0, 0.2, 0.3):
        out[f"ln(1+votes) + {iw} ln(1+inliers)"] = ("count", _score(iw, 0.0))
    for iw, ew in ((0.1, 0.2), (0.1, 0.4), (0.1, 1.0), (0.3, 0.4), (0.0, 0.4)):
        out[f"ln(1+votes) + {iw} ln(1+inliers) + {ew} ln(1+epipolar)"] = ("count", _score(iw, ew))
    return out


def _score(iw: float, ew: float):
    return lambda r: np.log1p(r["w"]) + iw * np.log1p(r["inliers"]) + ew * np.log1p(r["epi"])


def mean_ap(geo: dict, groups: dict, key, prefix: str) -> float:
    """mAP of the queries of one set (``prefix``) ranked by ``key``, as the lab counts it
    (``bench_accuracy.metrics``: the other set's photos of the query's place are junk)."""
    rankings = {q: bench_accuracy.rank_by(rows, key) for q, rows in geo.items() if q.startswith(prefix + "/")}
    return bench_accuracy.metrics(rankings, groups, {}, pooled_sets=True)["all"]["map"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-accuracy"), help="extracted features (npz per set)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    data = bench_accuracy.load(args.cache, {})
    if len(data) < 2:
        print("landmarks-dev and landmarks-hard are both needed under ../shared/data: nothing to measure",
              file=sys.stderr)
        return 0
    pooled = bench_accuracy.pooled(data)
    alone = {s: {f"{s}/{i}": (f"{s}/{g}", c, f) for i, (g, c, f) in feats.items()} for s, feats in data.items()}
    t = time.monotonic()
    geo = {"pooled": shortlists(pooled), **{s: shortlists(feats) for s, feats in alone.items()}}
    print(f"shortlists verified in {time.monotonic() - t:.0f} s", file=sys.stderr)
    out = []
    print(f"{'rule':<64} {'dev':>6} {'+distr':>6} {'gap':>6} {'hard':>6} {'+distr':>6} {'gap':>6}")
    for name, (w, key) in rules().items():
        row = {"rule": name}
        for s, short in (("landmarks-dev", "dev"), ("landmarks-hard", "hard")):
            row[short] = mean_ap(geo[s][w], {i: f[0] for i, f in alone[s].items()}, key, s)
            row[f"{short}_distr"] = mean_ap(geo["pooled"][w], {i: f[0] for i, f in pooled.items()}, key, s)
        out.append(row)
        print(f"{name[:64]:<64} {row['dev']:>6.3f} {row['dev_distr']:>6.3f} {row['dev_distr'] - row['dev']:>+6.3f} "
              f"{row['hard']:>6.3f} {row['hard_distr']:>6.3f} {row['hard_distr'] - row['hard']:>+6.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
