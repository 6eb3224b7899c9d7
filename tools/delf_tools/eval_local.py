"""Local-feature matching outside the system, for `delf eval`'s RootSIFT baseline and the
benchmark scripts: RootSIFT features, the indexer's voting with exact kNN, and re-ranking
with the verifier's RANSAC and the shared ranking rule."""
from __future__ import annotations

import dataclasses

import numpy as np

SIFT_FEATURES = 1000


@dataclasses.dataclass
class LocalFeatures:
    xy: np.ndarray          # (N, 2) float32, pixels of the (capped) photo
    desc: np.ndarray        # (N, D) float32, unit L2
    size: tuple[int, int]   # (width, height)
    scale: np.ndarray | None = None  # (N,) DELF scales (1 / pyramid scale); None for SIFT


def rootsift(rgb: np.ndarray, max_features: int = SIFT_FEATURES) -> LocalFeatures:
    """OpenCV SIFT keypoints (the strongest max_features) with RootSIFT descriptors."""
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    kps, desc = cv2.SIFT_create(nfeatures=max_features).detectAndCompute(gray, None)
    h, w = gray.shape
    if desc is None or not kps:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (w, h))
    order = np.argsort([-k.response for k in kps], kind="stable")[:max_features]
    xy = np.array([kps[i].pt for i in order], np.float32).reshape(-1, 2)
    d = desc[order].astype(np.float32)
    d /= d.sum(1, keepdims=True) + 1e-12   # L1 (SIFT values are non-negative)
    return LocalFeatures(xy, np.sqrt(d), (w, h))


class ExactVoter:
    """The indexer's voting (``delf_indexer.voting.vote``, as `DescriptorStore.search` calls
    it) over exact numpy kNN."""

    def __init__(self, features: dict[str, LocalFeatures]):
        self.ids = list(features)
        self.names = np.array(self.ids, dtype=object)
        counts = [len(features[i].desc) for i in self.ids]
        self.desc = np.concatenate([features[i].desc for i in self.ids]).astype(np.float32)
        self.xy = np.concatenate([features[i].xy for i in self.ids]).astype(np.float32)
        self.scale = None
        if all(features[i].scale is not None for i in self.ids):
            self.scale = np.concatenate([features[i].scale for i in self.ids]).astype(np.float32)
        self.owner = np.repeat(np.arange(len(self.ids)), counts)
        ends = np.cumsum(counts)
        self.span = {i: (int(e - c), int(e)) for i, c, e in zip(self.ids, counts, ends)}
        self.sq = (self.desc ** 2).sum(1)

    def knn(self, q: np.ndarray, k: int, exclude: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(distances (n, k'), row indices (n, k')) of the k nearest rows, sorted; k' <= k."""
        k = min(k, len(self.desc) - (self.span[exclude][1] - self.span[exclude][0] if exclude else 0))
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        dist_out, idx_out = [], []
        for s in range(0, len(q), 256):
            qq = q[s:s + 256]
            d2 = (qq ** 2).sum(1)[:, None] + self.sq[None] - 2.0 * qq @ self.desc.T
            if exclude is not None:
                a, b = self.span[exclude]
                d2[:, a:b] = np.inf
            part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < d2.shape[1] else \
                np.tile(np.arange(d2.shape[1]), (len(qq), 1))
            pd = np.take_along_axis(d2, part, 1)
            order = np.argsort(pd, 1, kind="stable")
            idx_out.append(np.take_along_axis(part, order, 1))
            dist_out.append(np.sqrt(np.maximum(np.take_along_axis(pd, order, 1), 0.0)))
        return np.concatenate(dist_out), np.concatenate(idx_out)

    def search(self, q: np.ndarray, shortlist: int, neighbours: int, ratio: float,
               exclude: str | None = None, voting_only: bool = False) -> list[dict]:
        """Candidates best votes first: {image_id, votes, query_idx (M,), db_xy (M, 2)}
        and db_scale (M,) when every image's features have scales.

        Correspondences as the indexer returns them (each query descriptor's nearest
        fetched neighbour in that image), or with ``voting_only`` only from neighbours
        that passed the ratio test (an experiment of scripts/bench_ranking.py).
        """
        from delf_indexer.voting import fetched_neighbours, vote

        if len(q) == 0 or shortlist <= 0:
            return []
        dists, rows = self.knn(np.ascontiguousarray(q, np.float32), fetched_neighbours(neighbours), exclude)
        out = []
        for c in vote(dists, self.names[self.owner[rows]], neighbours, ratio, shortlist,
                      voting_only=voting_only):
            db = rows[c.query_idx, c.neighbour]
            cand = {"image_id": c.image_id, "votes": c.votes, "query_idx": c.query_idx,
                    "db_xy": self.xy[db].reshape(-1, 2)}
            if self.scale is not None:
                cand["db_scale"] = self.scale[db]
            out.append(cand)
        return out


def rerank(query: LocalFeatures, candidates: list[dict], ransac_px: float, verified_score: float) -> list[dict]:
    """The verifier's verdict (``judge``: plane-model inliers and the shared score) on every
    candidate, ranked by the shared rule."""
    from delf_common.ranking import rank_matches
    from delf_verifier.ransac import judge

    matches = []
    for c in candidates:
        v = judge(query.xy[c["query_idx"]], c["db_xy"], query.size, None, c["votes"],
                  verified_score=verified_score, ransac_px=ransac_px)
        matches.append({"image_id": c["image_id"], "votes": c["votes"], "inliers": v.inliers,
                        "verified": v.verified})
    return rank_matches(matches)
