"""Celery task ``delf.verify`` (docs/CONTRACTS.md).

Worker: ``celery -A delf_verifier.tasks worker -Q <DELF_QUEUE_PREFIX>.verify``
(prefork or threads; OpenCV releases the GIL inside RANSAC).
The gateway splits a shortlist across several calls to verify them in parallel.
Its messages are delf_common.messages' VerifyQuery, SearchCandidate and VerifiedMatch.
"""
from __future__ import annotations

from delf_common import config
from delf_common.celery_app import VERIFY, app
from delf_common.contract import INVALID_ARGUMENT, error, ok
from delf_common.messages import SearchCandidate, VerifiedMatch, VerifyQuery
from delf_common.metrics import install_worker_hooks

from delf_verifier.ransac import rank, verify

install_worker_hooks()  # task counters and timings; /metrics on DELF_METRICS_PORT


def _error(message: str) -> dict:
    return error(INVALID_ARGUMENT, message)


def _options(options: dict | None) -> dict:
    options = options or {}
    min_ratio = options.get("min_inlier_ratio")
    return {
        "min_inliers": int(options.get("min_inliers") or config.get("DELF_MIN_INLIERS")),
        "ransac_px": float(options.get("ransac_px") or config.get("DELF_RANSAC_PX")),
        "min_inlier_ratio": float(config.get("DELF_MIN_INLIER_RATIO") if min_ratio is None else min_ratio),
    }


def _mismatch(query: VerifyQuery, cand: SearchCandidate) -> str | None:
    """Why the candidate's correspondences do not fit the query, or None."""
    qidx, n = cand.query_idx, len(query.locations)
    if len(qidx) != len(cand.db_xy) or (len(qidx) and (qidx.min() < 0 or qidx.max() >= n)):
        return f"candidate {cand.image_id!r}: query_idx out of range or not matching db_xy"
    if cand.db_scale is not None and len(cand.db_scale) != len(cand.db_xy):
        return f"candidate {cand.image_id!r}: db_scale not matching db_xy"
    return None


def verify_candidates(query: dict, candidates: list[dict], options: dict | None = None) -> dict:
    """``{"ok": True, "matches": [VerifiedMatch wire, ...]}`` best first, or INVALID_ARGUMENT."""
    opts = _options(options)
    try:
        q = VerifyQuery.from_wire(query)
    except (KeyError, TypeError, ValueError) as exc:
        return _error(f"malformed query: {exc}")
    matches = []
    for wire in candidates or []:
        try:
            cand = SearchCandidate.from_wire(wire)
        except (KeyError, TypeError, ValueError) as exc:
            return _error(f"malformed candidate: {exc}")
        if (why := _mismatch(q, cand)) is not None:
            return _error(why)
        both = q.scales is not None and cand.db_scale is not None
        v = verify(q.locations[cand.query_idx], cand.db_xy, q.image_size, q.box, **opts,
                   query_scale=q.scales[cand.query_idx] if both else None,
                   db_scale=cand.db_scale if both else None)
        matches.append(VerifiedMatch(cand.image_id, cand.votes, v.inliers, v.verified, v.transform, v.corners))
    return ok(matches=rank([m.to_wire() for m in matches]))


@app.task(name=VERIFY)
def verify_task(query, candidates, options=None) -> dict:
    return verify_candidates(query, candidates, options)
