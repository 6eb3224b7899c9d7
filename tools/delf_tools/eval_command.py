"""`delf eval`: retrieval quality of the running system against two baselines.

    delf eval MANIFEST [--gateway ADDR] [--json PATH] [--plot PATH]
                       [--methods delf,global-gem,sift] [--limit N]

MANIFEST is a tab-separated file with a header row and `path` (relative to the
manifest's folder) and `group` columns (`delf_tools.evaluation`). Every photo is
in the database; every photo whose group has another is a query, left out of its
own ranking; its positives are the other photos of its group. Ids are the path
without its extension (`a/b.jpg` -> `a/b`).

Methods (the same queries, top 100 ranked, searched by the indexed item, so the
latency is the search alone, without extracting the query again):

* ``delf``: the RUNNING system, through its gateway (``--gateway`` or DELF_GATEWAY).
  All photos are ingested as one job under their ids - into the running index, which
  keeps them afterwards (and whose other photos take part in the rankings): run it
  against a fresh collection (e.g. ``delf up --data-dir /tmp/evaldata``). Then one
  ``Search(image_id=..., top_k=100)`` per query. Ingest rate: the whole job, upload to
  indexed.
* ``global-gem``: one global vector per photo, as in the Milvus reverse-image-search
  demo: the same EfficientNet-Lite0 backbone (its 1280-channel head output, the deepest
  layer: best for a pooled descriptor in DELF-NOTES.md), GeM pooling (p = 3) at three
  scales (0.707, 1, 1.414 of the photo with its long side capped at 1024 px), the
  L2-normalised scale vectors averaged and L2-normalised; stored and searched (FLAT, inner
  product) in a temporary Milvus Lite file.
* ``sift``: RootSIFT (OpenCV SIFT, at most 1000 keypoints per photo, L1-normalised then
  square-rooted) with the system's voting (exact kNN: 11 nearest neighbours, ratio 0.9
  against the 11th, one vote per query descriptor and image), the gateway's shortlist
  (max(DELF_SHORTLIST, top_k)) and RANSAC re-ranking with the verifier's `verify` and the
  shared `rank_matches` (verified as in the system: DELF_MIN_INLIERS and
  DELF_MIN_INLIER_RATIO).

Metrics per method: mAP (`average_precision` over the top 100), precision@1,
recall@10, median and p95 search latency, ingest photos/s; ``--plot`` draws the
interpolated precision-recall curves (averaged over queries) as a PNG with OpenCV.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from delf_common import config
from delf_tools.evaluation import average_precision, queries_and_positives, read_manifest

METHODS = ("delf", "global-gem", "sift")
TOP_K = 100
RECALL_LEVELS = np.linspace(0.0, 1.0, 21)
MAX_SIDE = 1024
GEM_P = 3.0
GEM_SCALES = (0.7071, 1.0, 1.4142)
SIFT_FEATURES = 1000


class EvalError(Exception):
    """A problem the user must fix (bad manifest, no gateway); the message says what."""


@dataclasses.dataclass(frozen=True)
class Photo:
    image_id: str
    path: Path
    rel: str
    group: str


@dataclasses.dataclass
class MethodRun:
    """What one method produced: a ranking per query and timings."""

    rankings: dict[str, list[str]]
    latencies: list[float]
    ingest_s: float
    ingested: int


# --------------------------------------------------------------------------- manifest


def load_photos(manifest: str | Path, limit: int | None = None,
                warn: Callable[[str], None] = lambda m: None) -> list[Photo]:
    """The manifest's photos that exist (missing ones reported through `warn` and skipped)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise EvalError(f"no manifest at {manifest} (a tab-separated file with 'path' and 'group' columns)")
    try:
        rows = read_manifest(manifest)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    except (IndexError, UnicodeDecodeError) as exc:
        raise EvalError(f"{manifest}: not a readable tab-separated manifest ({exc})") from None
    if limit:
        rows = rows[:limit]
    photos, missing, seen = [], [], set()
    for rel, group in rows:
        path = manifest.parent / rel
        image_id = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
        if image_id in seen:
            warn(f"duplicate id {image_id!r} ({rel}): skipped")
            continue
        if not path.is_file():
            missing.append(rel)
            continue
        seen.add(image_id)
        photos.append(Photo(image_id, path, rel, group))
    if missing:
        warn(f"{len(missing)} photo(s) of the manifest not found, skipped: " + ", ".join(missing[:10])
             + (" ..." if len(missing) > 10 else ""))
    if not photos:
        raise EvalError(f"{manifest}: none of its photos exist below {manifest.parent}")
    return photos


# --------------------------------------------------------------------------- metrics


def precision_at(ranked: list, positives: set, k: int = 1) -> float:
    """Fraction of the first k results that are positives (missing ranks count as misses)."""
    return sum(1 for item in ranked[:k] if item in positives) / k


def recall_at(ranked: list, positives: set, k: int = 10) -> float:
    """Fraction of the positives found in the first k results."""
    return len(set(ranked[:k]) & positives) / len(positives) if positives else 0.0


def interpolated_pr(ranked: list, positives: set, levels: np.ndarray = RECALL_LEVELS) -> np.ndarray:
    """Interpolated precision at each recall level: the best precision at any rank whose
    recall reaches that level (0 where the ranking never reaches it)."""
    out = np.zeros(len(levels))
    if not positives:
        return out
    hits, points = 0, []
    for rank, item in enumerate(ranked, 1):
        if item in positives:
            hits += 1
            points.append((hits / len(positives), hits / rank))
    for i, level in enumerate(levels):
        reached = [p for r, p in points if r >= level - 1e-9]
        out[i] = max(reached) if reached else 0.0
    return out


def summarise(run: MethodRun, queries: dict[str, set[str]], n_photos: int) -> dict:
    """The JSON figures of one method (plus its mean PR curve under ``pr_curve``)."""
    aps, p1, r10, curves = [], [], [], []
    for q, positives in queries.items():
        ranked = run.rankings.get(q, [])
        aps.append(average_precision(ranked, positives))
        p1.append(precision_at(ranked, positives, 1))
        r10.append(recall_at(ranked, positives, 10))
        curves.append(interpolated_pr(ranked, positives))
    lat = sorted(run.latencies)
    return {
        "map": float(np.mean(aps)) if aps else 0.0,
        "precision_at_1": float(np.mean(p1)) if p1 else 0.0,
        "recall_at_10": float(np.mean(r10)) if r10 else 0.0,
        "latency_median_s": float(statistics.median(lat)) if lat else 0.0,
        "latency_p95_s": float(np.percentile(lat, 95)) if lat else 0.0,
        "ingest_photos_per_s": (run.ingested / run.ingest_s) if run.ingest_s > 0 else 0.0,
        "queries": len(queries),
        "pr_curve": (np.mean(curves, 0) if curves else np.zeros(len(RECALL_LEVELS))).tolist(),
    }


JSON_KEYS = ("map", "precision_at_1", "recall_at_10", "latency_median_s", "latency_p95_s",
             "ingest_photos_per_s", "queries")


def format_table(results: dict[str, dict]) -> str:
    head = (f"{'method':<11} {'mAP':>6} {'P@1':>6} {'R@10':>6} {'lat med (s)':>11} {'lat p95 (s)':>11} "
            f"{'ingest (photos/s)':>17} {'queries':>7}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<11} {r['map']:>6.3f} {r['precision_at_1']:>6.3f} {r['recall_at_10']:>6.3f} "
                     f"{r['latency_median_s']:>11.3f} {r['latency_p95_s']:>11.3f} "
                     f"{r['ingest_photos_per_s']:>17.2f} {r['queries']:>7d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- photos


def load_rgb(path: Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """RGB uint8 of a photo as the system decodes it (EXIF orientation applied), long side capped."""
    import cv2

    from delf_common.images import decode_image

    rgb = decode_image(path.read_bytes())
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


# --------------------------------------------------------------------------- delf (the system)


def connect(gateway: str | None, token: str | None = None, tls_ca: str | None = None,
            timeout: float | None = None):
    """A DelfClient to a reachable gateway, or EvalError saying how to start one."""
    import grpc

    from delf_common.client import DelfClient

    client = DelfClient(gateway, timeout=timeout or 600.0, token=token, tls_ca=tls_ca)
    try:
        client.wait_ready(timeout=10)
    except grpc.FutureTimeoutError:
        client.close()
        raise EvalError(
            f"cannot reach the gateway at {client.target}: start the system first (`make up`, or "
            f"`delf up --data-dir /tmp/evaldata` for a fresh index) and pass its address with "
            f"--gateway or DELF_GATEWAY (a TLS gateway also needs --tls-ca / DELF_TLS_CA)") from None
    return client


def run_delf(photos: list[Photo], queries: dict[str, set[str]], client, top_k: int = TOP_K,
             log: Callable[[str], None] = print) -> MethodRun:
    """Ingest every photo as one job through the gateway, then search by indexed id."""
    import grpc

    from delf_common.proto.delf.v1 import delf_pb2

    def items():
        for p in photos:
            yield delf_pb2.IngestItem(image_id=p.image_id, metadata={"path": p.rel, "group": p.group},
                                      image=p.path.read_bytes())

    t = time.monotonic()
    job = client.start_ingest_job(items())
    log(f"delf: ingest job {job.job_id} ({len(photos)} photos) into the running index ...")
    job = client.wait_job(job.job_id)
    ingest_s = time.monotonic() - t
    for err in job.errors:
        log(f"delf: not indexed {err.image_id}: {err.reason}")
    rankings, latencies = {}, []
    for n, q in enumerate(queries, 1):
        t = time.monotonic()
        try:
            response = client.search(image_id=q, top_k=top_k)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log(f"delf: query {q} is not in the index ({exc.details()}); counted as a miss")
            rankings[q] = []
            continue
        latencies.append(time.monotonic() - t)
        rankings[q] = [m.image_id for m in response.matches]
        if n % 20 == 0:
            log(f"delf: {n}/{len(queries)} queries")
    return MethodRun(rankings, latencies, ingest_s, job.done)


# --------------------------------------------------------------------------- global GeM baseline


class GemExtractor:
    """GeM-pooled (p=3), L2-normalised 1280-d vectors of EfficientNet-Lite0's head output,
    averaged over scales. Reuses the extractor's network and preprocessing (`models.DelfNet`)."""

    def __init__(self, scales=GEM_SCALES, p: float = GEM_P, device: str | None = "cpu",
                 pretrained: bool = True):
        import torch
        from torch import nn

        from delf_extractor import models

        class HeadOutput(nn.Module):  # the full network's last feature map, before pooling / fc
            def __init__(self, net: models.EfficientNetLite0):
                super().__init__()
                self.net = net

            def forward(self, x):
                x = self.net.features(x)
                return torch.nn.functional.relu6(self.net._bn1(self.net._conv_head(x)))

        base = models.get_config("effnet-lite0")
        self.cfg = dataclasses.replace(base, name="effnet-lite0-gem", layer="head", channels=1280,
                                       scales=tuple(scales))
        self.device = models.resolve_device(device)
        backbone = HeadOutput(models.load_lite0(None, pretrained=pretrained))
        self.net = models.DelfNet(self.cfg, backbone, None).eval().to(self.device)
        self.p = p

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w = rgb.shape[:2]
        x = torch.from_numpy(np.array(rgb, np.uint8)).to(self.device).permute(2, 0, 1)[None].float()
        acc = torch.zeros(self.cfg.channels, device=self.device)
        with torch.inference_mode():
            for s in self.cfg.scales:
                size = (max(32, round(h * s)), max(32, round(w * s)))
                level = x if size == (h, w) else F.interpolate(
                    x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)
                feats, _ = self.net(level)
                g = feats.float().clamp(min=1e-6).pow(self.p).mean((2, 3)).pow(1.0 / self.p)[0]
                acc += F.normalize(g, dim=0)
            return F.normalize(acc, dim=0).cpu().numpy().astype(np.float32)


def run_global_gem(photos: list[Photo], queries: dict[str, set[str]], top_k: int = TOP_K,
                   log: Callable[[str], None] = print, extractor: GemExtractor | None = None) -> MethodRun:
    """Global GeM vectors in a temporary Milvus Lite collection (FLAT, inner product)."""
    from pymilvus import DataType, MilvusClient

    from delf_indexer.store import quote

    t = time.monotonic()
    gem = extractor or GemExtractor()
    vectors: dict[str, np.ndarray] = {}
    for n, p in enumerate(photos, 1):
        try:
            vectors[p.image_id] = gem(load_rgb(p.path))
        except Exception as exc:  # a photo the system would refuse too
            log(f"global-gem: skipped {p.rel}: {exc}")
        if n % 20 == 0:
            log(f"global-gem: {n}/{len(photos)} photos")
    with tempfile.TemporaryDirectory(prefix="delf-eval-") as tmp:
        uri = os.path.join(tmp, "gem.db")
        client = MilvusClient(uri=uri)
        try:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("image_id", DataType.VARCHAR, max_length=512, is_primary=True)
            schema.add_field("vec", DataType.FLOAT_VECTOR, dim=gem.cfg.channels)
            index = client.prepare_index_params()
            index.add_index("vec", index_type="FLAT", metric_type="IP")
            client.create_collection("gem", schema=schema, index_params=index, consistency_level="Strong")
            rows = [{"image_id": i, "vec": v} for i, v in vectors.items()]
            for s in range(0, len(rows), 500):
                client.insert("gem", rows[s:s + 500])
            client.flush("gem")
            client.load_collection("gem")
            ingest_s = time.monotonic() - t
            rankings, latencies = {}, []
            for q in queries:
                if q not in vectors:
                    rankings[q] = []
                    continue
                t = time.monotonic()
                hits = client.search("gem", data=[vectors[q]], limit=top_k, filter=f"image_id != {quote(q)}",
                                     anns_field="vec", output_fields=["image_id"],
                                     search_params={"metric_type": "IP"})[0]
                latencies.append(time.monotonic() - t)
                rankings[q] = [h["entity"]["image_id"] for h in hits]
        finally:
            client.close()
            try:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(uri)
            except Exception:  # pragma: no cover - depends on milvus-lite internals
                pass
    return MethodRun(rankings, latencies, ingest_s, len(vectors))


# --------------------------------------------------------------------------- RootSIFT baseline


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
    """The indexer's voting (`DescriptorStore.search`) with exact numpy kNN."""

    def __init__(self, features: dict[str, LocalFeatures]):
        self.ids = list(features)
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
        if len(q) == 0 or shortlist <= 0:
            return []
        k = neighbours + 1
        dists, rows = self.knn(np.ascontiguousarray(q, np.float32), k, exclude)
        votes: dict[int, int] = {}
        vote_dist: dict[int, float] = {}
        nearest: dict[int, dict[int, tuple[float, int]]] = {}
        for qi in range(len(q)):
            d_row, r_row = dists[qi], rows[qi]
            bar = ratio * d_row[-1] if len(d_row) >= k else np.inf
            voted = set()
            for j in range(len(d_row)):
                img, d, r = int(self.owner[r_row[j]]), float(d_row[j]), int(r_row[j])
                votes_here = j < neighbours and d < bar and img not in voted
                if votes_here or not voting_only:
                    near = nearest.setdefault(img, {})
                    if qi not in near or d < near[qi][0]:
                        near[qi] = (d, r)
                if votes_here:
                    voted.add(img)
                    votes[img] = votes.get(img, 0) + 1
                    vote_dist[img] = vote_dist.get(img, 0.0) + d
        ranked = sorted(votes, key=lambda i: (-votes[i], vote_dist[i], self.ids[i]))[:shortlist]
        out = []
        for img in ranked:
            near = nearest[img]
            qidx = np.array(sorted(near), np.int64)
            rows = [near[i][1] for i in qidx]
            out.append({"image_id": self.ids[img], "votes": votes[img], "query_idx": qidx,
                        "db_xy": self.xy[rows].reshape(-1, 2)})
            if self.scale is not None:
                out[-1]["db_scale"] = self.scale[rows]
        return out


def rerank(query: LocalFeatures, candidates: list[dict], min_inliers: int, ransac_px: float,
           min_inlier_ratio: float = 0.0) -> list[dict]:
    """The verifier's RANSAC on every candidate, ranked by the shared rule."""
    from delf_common.ranking import rank_matches
    from delf_verifier.ransac import verify

    matches = []
    for c in candidates:
        v = verify(query.xy[c["query_idx"]], c["db_xy"], query.size, None,
                   min_inliers=min_inliers, ransac_px=ransac_px, min_inlier_ratio=min_inlier_ratio)
        matches.append({"image_id": c["image_id"], "votes": c["votes"], "inliers": v.inliers,
                        "verified": v.verified})
    return rank_matches(matches)


def run_sift(photos: list[Photo], queries: dict[str, set[str]], top_k: int = TOP_K,
             log: Callable[[str], None] = print) -> MethodRun:
    t = time.monotonic()
    feats: dict[str, LocalFeatures] = {}
    for n, p in enumerate(photos, 1):
        try:
            feats[p.image_id] = rootsift(load_rgb(p.path))
        except Exception as exc:
            log(f"sift: skipped {p.rel}: {exc}")
        if n % 20 == 0:
            log(f"sift: {n}/{len(photos)} photos")
    voter = ExactVoter(feats)
    ingest_s = time.monotonic() - t
    # As the gateway: the shortlist covers top_k; verified as the verifier decides.
    shortlist = max(config.get("DELF_SHORTLIST"), top_k)
    neighbours, ratio = config.get("DELF_NEIGHBOURS"), config.get("DELF_RATIO")
    min_inliers, ransac_px = config.get("DELF_MIN_INLIERS"), config.get("DELF_RANSAC_PX")
    min_ratio = config.get("DELF_MIN_INLIER_RATIO")
    rankings, latencies = {}, []
    for n, q in enumerate(queries, 1):
        if q not in feats:
            rankings[q] = []
            continue
        t = time.monotonic()
        cands = voter.search(feats[q].desc, shortlist, neighbours, ratio, exclude=q)
        ranked = rerank(feats[q], cands, min_inliers, ransac_px, min_ratio)[:top_k]
        latencies.append(time.monotonic() - t)
        rankings[q] = [m["image_id"] for m in ranked]
        if n % 20 == 0:
            log(f"sift: {n}/{len(queries)} queries")
    return MethodRun(rankings, latencies, ingest_s, len(feats))


# --------------------------------------------------------------------------- plot

COLOURS = {"delf": (180, 90, 20), "global-gem": (0, 140, 255), "sift": (60, 160, 60)}  # BGR


def plot_pr(results: dict[str, dict], path: str | Path, levels: np.ndarray = RECALL_LEVELS) -> None:
    """Interpolated precision-recall curves (one per method) as a PNG, drawn with OpenCV."""
    import cv2

    W, H, left, right, top, bottom = 900, 680, 90, 30, 50, 80
    img = np.full((H, W, 3), 255, np.uint8)
    pw, ph = W - left - right, H - top - bottom

    def to_px(r: float, p: float) -> tuple[int, int]:
        return int(round(left + r * pw)), int(round(top + (1.0 - p) * ph))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in range(11):
        v = i / 10
        x, _ = to_px(v, 0)
        _, y = to_px(0, v)
        cv2.line(img, (x, top), (x, top + ph), (225, 225, 225), 1)
        cv2.line(img, (left, y), (left + pw, y), (225, 225, 225), 1)
        cv2.putText(img, f"{v:.1f}", (x - 14, top + ph + 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{v:.1f}", (left - 38, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    cv2.putText(img, "recall", (left + pw // 2 - 25, H - 25), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "precision", (10, top - 15), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "interpolated precision-recall, mean over queries", (left + 150, top - 15),
                font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    extra = [(40, 40, 200), (150, 50, 150), (90, 90, 90)]
    for n, (name, r) in enumerate(results.items()):
        colour = COLOURS.get(name) or extra[n % len(extra)]
        pts = np.array([to_px(rr, pp) for rr, pp in zip(levels, r["pr_curve"])], np.int32)
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 2, cv2.LINE_AA)
        for x, y in pts:
            cv2.circle(img, (int(x), int(y)), 3, colour, -1, cv2.LINE_AA)
        ly = top + ph - 20 - 24 * (len(results) - 1 - n)
        cv2.line(img, (left + 20, ly - 5), (left + 50, ly - 5), colour, 3, cv2.LINE_AA)
        cv2.putText(img, f"{name}  mAP {r['map']:.3f}", (left + 58, ly), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise EvalError(f"could not write the plot to {path} (use a .png name)")


# --------------------------------------------------------------------------- command


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="delf eval",
        description="Retrieval quality (mAP, precision@1, recall@10, latency, ingest rate) of the running "
                    "system ('delf') against two baselines ('global-gem': GeM vectors of the same backbone "
                    "in Milvus Lite; 'sift': RootSIFT with the same voting and RANSAC), on a manifest with "
                    "ground-truth groups. NOTE: method 'delf' ingests every photo of the manifest into the "
                    "RUNNING index (ids = path without extension), where they stay, and other photos of "
                    "that index take part in the rankings: run it against a system with a fresh, empty "
                    "collection (e.g. `delf up --data-dir /tmp/evaldata`).")
    p.add_argument("manifest", help="MANIFEST.tsv: header row, tab-separated, 'path' (relative to its folder) "
                                    "and 'group' columns")
    p.add_argument("--gateway", default=None, help="gateway address (default: $DELF_GATEWAY or 127.0.0.1:50051)")
    p.add_argument("--token", default=None, help="bearer token (default: $DELF_TOKEN)")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="CA to trust for a TLS gateway (default: $DELF_TLS_CA)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for one gateway answer (default 600)")
    p.add_argument("--methods", type=_methods, default=list(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON, {method: {...}}")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a precision-recall plot (PNG)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the manifest's first N photos")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"results ranked per query (default {TOP_K})")
    return p


def evaluate(photos: list[Photo], methods: list[str], client=None, top_k: int = TOP_K,
             log: Callable[[str], None] = print) -> dict[str, dict]:
    """{method: figures (JSON_KEYS plus pr_curve)} on the given photos."""
    groups = {p.image_id: p.group for p in photos}
    queries = queries_and_positives(groups)
    if not queries:
        raise EvalError("no group has two photos: there is nothing to query")
    log(f"{len(photos)} photos, {len(queries)} queries, methods {', '.join(methods)}")
    results = {}
    for m in methods:
        if m == "delf":
            run = run_delf(photos, queries, client, top_k, log)
        elif m == "global-gem":
            run = run_global_gem(photos, queries, top_k, log)
        else:
            run = run_sift(photos, queries, top_k, log)
        results[m] = summarise(run, queries, len(photos))
        log(f"{m}: mAP {results[m]['map']:.3f}")
    return results


def main(argv: list[str] | None = None, *, gateway: str | None = None, token: str | None = None,
         tls_ca: str | None = None, timeout: float | None = None) -> int:
    """`delf eval`; the keyword arguments are the `delf` command's global options."""
    import grpc

    args = parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    client = None
    try:
        photos = load_photos(args.manifest, args.limit, warn=lambda m: log(f"delf eval: {m}"))
        if "delf" in args.methods:  # fail fast, before minutes of baseline work
            client = connect(args.gateway or gateway or config.get("DELF_GATEWAY"),
                             args.token if args.token is not None else token,
                             args.tls_ca if args.tls_ca is not None else tls_ca,
                             args.timeout or timeout)
        results = evaluate(photos, args.methods, client, args.top_k, log)
    except EvalError as exc:
        print(f"delf eval: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"delf eval: the gateway answered {exc.code().name}: {exc.details()}", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print("  is the system still running? (`make up` or `delf up` starts it)", file=sys.stderr)
        elif exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            print("  the gateway requires a token: --token or DELF_TOKEN", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()

    print(format_table(results))
    if args.json:
        out = {m: {k: r[k] for k in JSON_KEYS} for m, r in results.items()}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        try:
            plot_pr(results, args.plot)
        except EvalError as exc:
            print(f"delf eval: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
