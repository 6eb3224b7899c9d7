"""The one score of a search result, and the order of results, shared by the verifier (per
chunk), the gateway (merged), `delf eval`'s baselines and the benchmark scripts.

Every candidate gets the same kind of number, whatever geometry found:

    score = 1 / (1 + exp(-(SLOPE * (ln(1 + votes) + INLIER_WEIGHT * ln(1 + inliers)) + BIAS)))

``votes``: the query descriptors whose nearest neighbours (ratio test) vote for the photo;
``inliers``: the RANSAC inliers of the plausible plane model (homography, or affine with few
correspondences; 0 when no plausible model exists). The score rises with each of them, so no
photo with more votes and more inliers ranks below one with fewer; it reads as the chance
that the photo shows the query's place or object, as calibrated on landmarks-dev's shortlists
(BENCHMARKS.md, "Right on the hard photos"). A result is ``verified`` when its score reaches
DELF_VERIFIED_SCORE.

How the weights were chosen (``scripts/bench_accuracy.py --fit``, on landmarks-dev only):
INLIER_WEIGHT is the middle of the plateau of landmarks-dev's mAP over a grid (votes alone to
0.5); SLOPE and BIAS are a logistic fit of "same group" on that score over landmarks-dev's
shortlists, at DELF_NEIGHBOURS=7 (fitted again when the default went from 10 to 7:
BENCHMARKS.md, "Seven voting neighbours"). Votes carry most of the weight: on real photos they separate true pairs from
unrelated ones better than the inlier count (chance inliers of unrelated photos reach 30-40,
true wide-baseline and day/night pairs often have none), while inliers break ties between
photos with as many votes. The calibration holds for full photos searched with the default
DELF_QUERY_FEATURES and DELF_NEIGHBOURS; a query cut to a small box has fewer descriptors to
vote with and scores lower.
"""
from __future__ import annotations

import math

INLIER_WEIGHT = 0.1
SLOPE = 2.7231
BIAS = -7.9867


def match_score(votes: int, inliers: int) -> float:
    """The result's score in [0, 1] (module docstring)."""
    x = SLOPE * (math.log1p(max(votes, 0)) + INLIER_WEIGHT * math.log1p(max(inliers, 0))) + BIAS
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def rank_matches(matches: list[dict]) -> list[dict]:
    """Best first by score (ties: more inliers, more votes, then the image id); each match
    needs image_id, inliers and votes."""
    return sorted(matches, key=lambda m: (
        -match_score(m["votes"], m["inliers"]), -m["inliers"], -m["votes"], m["image_id"]))
