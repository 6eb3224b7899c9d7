"""DELF nearest-neighbour voting: the shortlist of database images for one query.

The heart of the method, as one pure function over the query's kNN results. Both the
indexer (``DescriptorStore.search``, neighbours from Milvus) and the evaluation
(``delf eval``'s exact numpy voter) call it, so the two cannot drift apart.

The rule (``vote``): for each query descriptor the ``neighbours + 1`` nearest database
descriptors are fetched; neighbour j (j < neighbours) votes for its image when its
distance is below ``ratio`` x the distance of the last fetched one (with fewer than
``neighbours + 1`` results - a tiny index - every fetched neighbour votes). A query
descriptor votes at most once per image. Images are ranked by votes (ties: the smaller
summed distance of the voting neighbours, then the image id).

Correspondences of a candidate: for every query descriptor with *any* fetched neighbour
in that image - voting or not - its nearest descriptor in that image. The ratio test is a
good ranking signal but drops true matches on repeated structure and when several
database images of the same place crowd the neighbour list; RANSAC (MAGSAC) tolerates
the extra outliers, and more true correspondences mean more inliers for true pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Collection, Hashable, Sequence

import numpy as np

KEEP_CHUNK = 500  # ranked images per call of vote()'s `keep`


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One shortlisted database image and its tentative correspondences.

    ``query_idx`` (M,): the query rows (positions in the kNN results) with a fetched
    neighbour in this image, ascending; ``neighbour`` (M,): for each of them the position,
    in that row's neighbour list, of its nearest neighbour in this image (look up its
    location, scale or database row there).
    """

    image_id: Hashable
    votes: int
    distance: float  # summed distance of the voting neighbours (the tie-break)
    query_idx: np.ndarray
    neighbour: np.ndarray


def vote(distances: Sequence[Sequence[float]], images: Sequence[Sequence[Hashable]],
         neighbours: int, ratio: float, shortlist: int | None,
         voting_only: bool = False,
         keep: Callable[[list], Collection] | None = None) -> list[Candidate]:
    """The shortlist, best first, from each query descriptor's nearest neighbours.

    ``distances[qi]``: the plain (not squared) Euclidean distances of query row qi's
    fetched neighbours, ascending (a list, or a row of a numpy array: ``ratio`` times its
    last entry is the bar, in that entry's type); ``images[qi]``: the image of each of
    those neighbours (any ordered hashable; ties are broken by it, so pass image ids).
    Up to ``neighbours + 1`` neighbours per row; rows may be shorter (or empty).

    ``shortlist``: at most that many candidates (None: every image with a vote).
    ``voting_only``: correspondences only from neighbours that passed the ratio test
    (an experiment of scripts/bench_ranking.py), instead of the nearest fetched one.
    ``keep``: a filter applied after ranking; called with successive chunks of up to
    ``KEEP_CHUNK`` ranked images (best first) until ``shortlist`` are kept, it returns
    those of the chunk to keep.
    """
    if shortlist is not None and shortlist <= 0:
        return []
    votes, vote_dist, nearest = _tally(distances, images, neighbours, ratio, voting_only)
    ordered = sorted(votes, key=lambda i: (-votes[i], vote_dist[i], i))
    ranked = _keep(ordered, shortlist, keep) if keep is not None else ordered[:shortlist]
    out = []
    for img in ranked:
        near = nearest[img]
        rows = sorted(near)
        out.append(Candidate(img, votes[img], vote_dist[img], np.array(rows, np.int64),
                             np.array([near[qi][1] for qi in rows], np.int64)))
    return out


def fetched_neighbours(neighbours: int) -> int:
    """How many nearest neighbours to fetch per query descriptor so that ``neighbours`` may
    vote: one more, the ratio test's reference (the indexer's search, `delf eval`)."""
    return neighbours + 1


def _tally(distances, images, neighbours: int, ratio: float, voting_only: bool):
    """(votes per image, summed voting distance per image, image -> {query row:
    (distance, neighbour position)} of the nearest fetched neighbour there)."""
    k = fetched_neighbours(neighbours)
    votes: dict = {}
    vote_dist: dict = {}
    nearest: dict = {}
    for qi, (dists, imgs) in enumerate(zip(distances, images)):
        if len(dists) == 0:
            continue
        bar = ratio * dists[-1] if len(dists) >= k else float("inf")
        voted = set()
        for j, img in enumerate(imgs):
            d = float(dists[j])
            votes_here = j < neighbours and d < bar and img not in voted
            if votes_here or not voting_only:
                near = nearest.setdefault(img, {})
                if qi not in near or d < near[qi][0]:
                    near[qi] = (d, j)
            if votes_here:
                voted.add(img)
                votes[img] = votes.get(img, 0) + 1
                vote_dist[img] = vote_dist.get(img, 0.0) + d
    return votes, vote_dist, nearest


def _keep(ordered: list, shortlist: int | None, keep: Callable[[list], Collection]) -> list:
    ranked: list = []
    for start in range(0, len(ordered), KEEP_CHUNK):
        chunk = ordered[start:start + KEEP_CHUNK]
        kept = set(keep(chunk))
        ranked.extend(img for img in chunk if img in kept)
        if shortlist is not None and len(ranked) >= shortlist:
            break
    return ranked[:shortlist]
