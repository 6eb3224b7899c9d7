"""A search's answer on the wire: voted candidates as the indexer task returns them (the
gateway passes them on to the verifier)."""
from __future__ import annotations

import json

import numpy as np

from delf_common.features import encode_array
from delf_indexer.voting import Candidate


def candidate_dicts(candidates: list[Candidate], hits: list, info: dict[str, dict],
                    chosen: np.ndarray | None) -> list[dict]:
    """The wire form of voted candidates (the indexer task's answer, the verifier's input):
    database locations and scales of the correspondences looked up in ``hits`` (as
    ``DescriptorStore._knn`` returns them), query rows mapped back through ``chosen``.
    Candidates without an images row in ``info`` (deleted while we searched) are dropped."""
    out = []
    for c in candidates:
        row = info.get(c.image_id)
        if row is None:
            continue
        pairs = list(zip(c.query_idx.tolist(), c.neighbour.tolist()))
        xy = np.array([(hits[qi][2][j], hits[qi][3][j]) for qi, j in pairs], np.float32).reshape(len(pairs), 2)
        db_scale = np.array([hits[qi][4][j] for qi, j in pairs], np.float32)
        rows = c.query_idx.tolist()
        qidx = np.array(rows if chosen is None else chosen[rows], np.int32)
        out.append({
            "image_id": c.image_id,
            "votes": c.votes,
            "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
            "width": int(row["width"]),
            "height": int(row["height"]),
            "query_idx": encode_array(qidx),
            "db_xy": encode_array(xy),
            "db_scale": encode_array(db_scale),
        })
    return out
