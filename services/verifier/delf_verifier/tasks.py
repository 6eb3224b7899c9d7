"""Celery task ``delf.verify`` (docs/CONTRACTS.md).

Worker: ``celery -A delf_verifier.tasks worker -Q <DELF_QUEUE_PREFIX>.verify``
(prefork or threads; OpenCV releases the GIL inside RANSAC).
The gateway splits a shortlist across several calls to verify them in parallel.
Its messages are delf_common.messages' VerifyQuery, SearchCandidate and VerifiedMatch.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from celery.signals import celeryd_after_setup

from delf_common.celery_app import app
from delf_common.contract import INVALID_ARGUMENT, VERIFY, error, ok
from delf_common.messages import SearchCandidate, VerifiedMatch, VerifyQuery
from delf_common.metrics import install_worker_hooks

from delf_verifier.ransac import judge, rank
from delf_verifier.settings import VerifierSettings

install_worker_hooks()  # task counters and timings; /metrics on DELF_METRICS_PORT
log = logging.getLogger(__name__)


@celeryd_after_setup.connect
def warm_up(**_kwargs) -> None:
    """Before the worker answers pings: one RANSAC on made-up correspondences, so that OpenCV
    and its thread pool are ready for the first search (issue 14, item 8)."""
    t = time.perf_counter()
    try:
        rng = np.random.default_rng(0)
        xy = rng.uniform(0, 200, (60, 2)).astype(np.float32)
        judge(xy, xy * 1.1 + 5, (200, 200), None, votes=60, verified_score=0.5, ransac_px=4.0)
    except Exception:  # a worker that cannot warm up still serves
        log.exception("warm-up failed")
        return
    log.info("warmed up: one RANSAC in %.2f s", time.perf_counter() - t)


def _error(message: str) -> dict:
    return error(INVALID_ARGUMENT, message)


_settings: VerifierSettings | None = None


def settings() -> VerifierSettings:
    """The worker process's settings, read from the environment at first use."""
    global _settings
    if _settings is None:
        _settings = VerifierSettings.from_env()
    return _settings


def _options(options: dict | None, defaults: VerifierSettings) -> dict:
    """The request's options over the settings: a value sent counts, even 0."""
    options = options or {}

    def pick(name: str):
        value = options.get(name)
        return float(getattr(defaults, name) if value is None else value)

    return {"verified_score": pick("verified_score"), "ransac_px": pick("ransac_px")}


def _mismatch(query: VerifyQuery, cand: SearchCandidate) -> str | None:
    """Why the candidate's correspondences do not fit the query, or None."""
    qidx, n = cand.query_idx, len(query.locations)
    if len(qidx) != len(cand.db_xy) or (len(qidx) and (qidx.min() < 0 or qidx.max() >= n)):
        return f"candidate {cand.image_id!r}: query_idx out of range or not matching db_xy"
    if cand.db_scale is not None and len(cand.db_scale) != len(cand.db_xy):
        return f"candidate {cand.image_id!r}: db_scale not matching db_xy"
    return None


def verify_candidates(query: dict, candidates: list[dict], options: dict | None = None,
                      defaults: VerifierSettings | None = None) -> dict:
    """``{"ok": True, "matches": [VerifiedMatch wire, ...]}`` best first, or INVALID_ARGUMENT.
    ``options``: ``verified_score`` and ``ransac_px`` (absent: the settings); with
    ``inlier_idx`` each match also says which correspondences are the plane model's inliers.
    ``defaults``: the settings for options left out (default: the process's, `settings`)."""
    try:
        opts = _options(options, defaults or settings())
    except (TypeError, ValueError) as exc:
        return _error(f"malformed options: {exc}")
    with_inliers = bool((options or {}).get("inlier_idx"))
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
        v = judge(q.locations[cand.query_idx], cand.db_xy, q.image_size, q.box, cand.votes, **opts,
                  query_scale=q.scales[cand.query_idx] if both else None,
                  db_scale=cand.db_scale if both else None)
        inlier_idx = None
        if with_inliers:
            inlier_idx = np.flatnonzero(v.inlier_mask) if v.inlier_mask is not None else np.zeros(0, np.int64)
        matches.append(VerifiedMatch(cand.image_id, cand.votes, v.inliers, v.verified, v.transform, v.corners,
                                     inlier_idx=inlier_idx))
    return ok(matches=rank([m.to_wire() for m in matches]))


@app.task(name=VERIFY)
def verify_task(query, candidates, options=None) -> dict:
    return verify_candidates(query, candidates, options)
