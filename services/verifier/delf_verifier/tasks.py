"""Celery task ``delf.verify`` (docs/CONTRACTS.md).

Worker: ``celery -A delf_verifier.tasks worker -Q <DELF_QUEUE_PREFIX>.verify``
(prefork or threads; OpenCV releases the GIL inside RANSAC).
The gateway splits a shortlist across several calls to verify them in parallel.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from celery.signals import celeryd_after_setup

from delf_common import config
from delf_common.celery_app import VERIFY, app
from delf_common.features import decode_array
from delf_common.metrics import install_worker_hooks

from delf_verifier.ransac import rank, verify

INVALID_ARGUMENT = "INVALID_ARGUMENT"

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
        verify(xy, xy * 1.1 + 5, (200, 200), None, min_inliers=8, ransac_px=4.0, min_inlier_ratio=0.1)
    except Exception:  # noqa: BLE001 - a worker that cannot warm up still serves
        log.exception("warm-up failed")
        return
    log.info("warmed up: one RANSAC in %.2f s", time.perf_counter() - t)


def _error(message: str) -> dict:
    return {"ok": False, "error": {"code": INVALID_ARGUMENT, "message": message}}


def verify_candidates(query: dict, candidates: list[dict], options: dict | None = None) -> dict:
    options = options or {}
    min_inliers = options.get("min_inliers") or config.get("DELF_MIN_INLIERS")
    ransac_px = options.get("ransac_px") or config.get("DELF_RANSAC_PX")
    min_ratio = options.get("min_inlier_ratio")
    min_ratio = config.get("DELF_MIN_INLIER_RATIO") if min_ratio is None else min_ratio
    try:
        locations = decode_array(query["locations"]).astype(np.float32).reshape(-1, 2)
        scales = query.get("scales")  # optional: refines verified transforms (ransac.refine)
        if scales is not None:
            scales = decode_array(scales).astype(np.float32).reshape(-1)
            if len(scales) != len(locations):
                return _error(f"query has {len(scales)} scales for {len(locations)} locations")
        image_size = tuple(int(v) for v in query["image_size"])
        box = query.get("box")
        if box is not None:
            box = [float(v) for v in box]
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                return _error(f"box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box}")
    except (KeyError, TypeError, ValueError) as exc:
        return _error(f"malformed query: {exc}")
    matches = []
    for cand in candidates or []:
        try:
            qidx = decode_array(cand["query_idx"]).astype(np.int64).reshape(-1)
            db_xy = decode_array(cand["db_xy"]).astype(np.float32).reshape(-1, 2)
            db_scale = cand.get("db_scale")
            if db_scale is not None:
                db_scale = decode_array(db_scale).astype(np.float32).reshape(-1)
        except (KeyError, TypeError, ValueError) as exc:
            return _error(f"malformed candidate: {exc}")
        if len(qidx) != len(db_xy) or (len(qidx) and (qidx.min() < 0 or qidx.max() >= len(locations))):
            return _error(f"candidate {cand.get('image_id')!r}: query_idx out of range or "
                          f"not matching db_xy")
        if db_scale is not None and len(db_scale) != len(db_xy):
            return _error(f"candidate {cand.get('image_id')!r}: db_scale not matching db_xy")
        both = scales is not None and db_scale is not None
        v = verify(locations[qidx], db_xy, image_size, box,
                   min_inliers=int(min_inliers), ransac_px=float(ransac_px),
                   min_inlier_ratio=float(min_ratio),
                   query_scale=scales[qidx] if both else None, db_scale=db_scale if both else None)
        matches.append({
            "image_id": cand["image_id"],
            "votes": int(cand.get("votes", 0)),
            "inliers": v.inliers,
            "verified": v.verified,
            "transform": v.transform,
            "corners": v.corners,
        })
    return {"ok": True, "matches": rank(matches)}


@app.task(name=VERIFY)
def verify_task(query, candidates, options=None) -> dict:
    return verify_candidates(query, candidates, options)
