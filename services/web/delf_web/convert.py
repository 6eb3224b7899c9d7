"""The gateway's protobuf replies as the JSON the HTTP API answers with."""
from __future__ import annotations

from urllib.parse import quote

from delf_common.proto.delf.v1 import delf_pb2


def thumbnail_url(image_id: str) -> str:
    return "/api/v1/thumbnails/" + quote(image_id, safe="")


def _round(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def point(p) -> dict:
    return {"x": _round(p.x, 2), "y": _round(p.y, 2)}


def match(m) -> dict:
    out = {
        "image_id": m.image_id,
        "score": _round(m.score),
        "verified": m.verified,
        "inliers": m.inliers,
        "votes": m.votes,
        "metadata": dict(m.metadata),
        "transform": [float(v) for v in m.transform],
        "corners": [point(c) for c in m.corners],
        "thumbnail": thumbnail_url(m.image_id),
    }
    if m.correspondences:
        out["correspondences"] = [
            {"query": point(c.query), "indexed": point(c.indexed), "inlier": c.inlier} for c in m.correspondences]
    return out


def search(reply) -> dict:
    return {
        "matches": [match(m) for m in reply.matches],
        "query_features": reply.query_features,
        "elapsed_s": _round(reply.elapsed_s),
        "verified_score": _round(reply.verified_score),
    }


def image(info) -> dict:
    return {
        "image_id": info.image_id,
        "metadata": dict(info.metadata),
        "width": info.width,
        "height": info.height,
        "num_features": info.num_features,
        "pca_id": info.pca_id,
        "thumbnail": thumbnail_url(info.image_id),
    }


def job(j) -> dict:
    return {
        "job_id": j.job_id,
        "state": delf_pb2.JobState.Name(j.state).removeprefix("JOB_STATE_"),
        "total": j.total,
        "done": j.done,
        "failed": j.failed,
        "errors": [{"image_id": e.image_id, "reason": e.reason} for e in j.errors],
        "created_at": j.created_at,
        "updated_at": j.updated_at,
        "rate": _round(j.rate),
        "eta_s": _round(j.eta_s, 1),
        "resent": j.resent,
        "awaiting_upload": j.awaiting_upload,
        "stalled": j.stalled,
        "hint": j.hint,
        "idle_s": _round(j.idle_s, 1),
    }


def stats(s) -> dict:
    return {
        "images": int(s.images),
        "descriptors": int(s.descriptors),
        "queue_depths": {k: int(v) for k, v in s.queue_depths.items()},
        "model": s.model,
        "pca_id": s.pca_id,
    }
