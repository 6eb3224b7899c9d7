"""The order of search results, shared by the verifier (per chunk) and the gateway (merged).

Verified matches (enough RANSAC inliers: DELF_MIN_INLIERS and DELF_MIN_INLIER_RATIO)
come first, by inliers (ties: votes); then the unverified ones by nearest-neighbour
votes (ties: inliers). Ranking by inliers alone lets chance inliers of unrelated
photos (often 10-35 with 1000 features) outrank true pairs; see BENCHMARKS.md.
"""
from __future__ import annotations


def rank_matches(matches: list[dict]) -> list[dict]:
    """Best first; each match needs image_id, verified, inliers and votes."""
    return sorted(matches, key=lambda m: (
        0 if m["verified"] else 1,
        -m["inliers"] if m["verified"] else -m["votes"],
        -m["votes"] if m["verified"] else -m["inliers"],
        m["image_id"],
    ))
