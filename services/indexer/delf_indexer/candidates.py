"""A search's answer on the wire: voted candidates as the indexer task returns them (the
gateway passes them on to the verifier), as delf_common.messages.SearchCandidate, and the
query descriptors a search uses (``query_rows``)."""
from __future__ import annotations

import json

import numpy as np

from delf_common.features import DelfFeatures
from delf_common.messages import SearchCandidate
from delf_indexer.voting import Candidate


def search_candidates(candidates: list[Candidate], hits: list, info: dict[str, dict],
                      chosen: np.ndarray | None) -> list[SearchCandidate]:
    """Voted candidates as messages: database locations and scales of the correspondences
    looked up in ``hits`` (as ``StorageBackend.knn`` returns them), query rows mapped back
    through ``chosen``. Candidates without an images row in ``info`` (deleted while we
    searched) are dropped."""
    out = []
    for c in candidates:
        row = info.get(c.image_id)
        if row is None:
            continue
        pairs = list(zip(c.query_idx.tolist(), c.neighbour.tolist()))
        xy = np.array([(hits[qi][2][j], hits[qi][3][j]) for qi, j in pairs], np.float32).reshape(len(pairs), 2)
        db_scale = np.array([hits[qi][4][j] for qi, j in pairs], np.float32)
        rows = c.query_idx.tolist()
        out.append(SearchCandidate(
            image_id=c.image_id,
            votes=c.votes,
            query_idx=np.array(rows if chosen is None else chosen[rows], np.int64),
            db_xy=xy,
            db_scale=db_scale,
            metadata=json.loads(row["metadata"]) if row["metadata"] else {},
            width=int(row["width"]),
            height=int(row["height"]),
        ))
    return out


def candidate_dicts(candidates: list[Candidate], hits: list, info: dict[str, dict],
                    chosen: np.ndarray | None) -> list[dict]:
    """The wire form of ``search_candidates`` (the indexer task's answer, the verifier's input)."""
    return [c.to_wire() for c in search_candidates(candidates, hits, info, chosen)]


def query_rows(features: DelfFeatures, limit: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(query descriptors to search with, their rows in ``features`` or None for all):
    the ``limit`` (DELF_QUERY_FEATURES; 0: all) best-scored ones, in feature order."""
    q = np.ascontiguousarray(features.descriptors, np.float32)
    chosen = None
    if 0 < limit < len(q):
        chosen = np.sort(np.argsort(-np.asarray(features.scores), kind="stable")[:limit])
        q = np.ascontiguousarray(q[chosen])
    return q, chosen
