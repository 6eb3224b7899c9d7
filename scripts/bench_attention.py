#!/usr/bin/env python
"""Does trained attention select better keypoints than the feature norm? (landmarks-dev, CPU)

Every photo of the manifest (115) is extracted and indexed with each keypoint-scoring
method; everything else is the same: the effnet-lite0 preset's backbone, pyramid
(max side 1024, scales 0.25-1.41), 32 px border, top 1000, the shipped PCA
(weights/effnet-lite0-pca40.npz) and the system's voting (`eval_local.ExactVoter`:
11 nearest neighbours, ratio 0.9 against the 11th, one vote per query descriptor and
photo, shortlist max(DELF_SHORTLIST, 100)); then, as the system does, RANSAC re-ranking
(`eval_local.rerank`, DELF_RANSAC_PX, DELF_VERIFIED_SCORE).

Queries: only photos of the HELD-OUT groups (`delf_tools.train_data.split_groups`; groups
never seen by `delf train-attention --split train`), each with another photo in its group;
the database holds all photos (training groups and the distractor included). For
reference, with ``--all-queries``, the table also gives mAP over the training-group
queries (seen in training: optimistic for attention) and over all queries.

Methods: ``norm`` (the L2 norm of the raw feature, the effnet-lite0 default) and one
``attention`` row per head file (``--heads``; default: the heads in the package's
weights/ folder), without a score threshold and with the threshold recorded in the
head's .json (if any). The backbone runs once per photo and level for all methods
(its output is shared), so s/photo = backbone seconds + the method's own seconds.
The "vs norm" column: mean per-query AP difference (RANSAC) +- its standard error,
and the number of queries that got better / worse.

    nice -n 10 python scripts/bench_attention.py [--heads FILE.pth ...] [--manifest M]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from delf_common import config
from delf_tools.eval_local import ExactVoter, LocalFeatures, rerank
from delf_tools.evaluation import average_precision, queries_and_positives, read_manifest
from delf_common.images import ImageLimits, decode_image
from delf_extractor import models
from delf_extractor.extract import DelfExtractor
from delf_tools.train_data import split_groups

TOP_K = 100


def landmarks_manifest() -> Path:
    env = os.environ.get("DELF_LANDMARKS_DIR")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/landmarks-dev"
    return folder / "MANIFEST.tsv"


class SharedBackbone(nn.Module):
    """One backbone for all extractors: the output for each input shape (= pyramid level of
    the current photo) is computed once; `clear()` between photos."""

    def __init__(self, inner: nn.Module, cache_dir: Path | None = None):
        super().__init__()
        self.inner = inner
        self.memo: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.cache_dir = cache_dir
        self.photo: str | None = None
        self.dirty = False

    def start(self, photo_key: str | None = None) -> None:
        """Begin a photo: its levels are read from ``cache_dir`` when stored there by an earlier run."""
        self.finish()
        self.memo, self.photo = {}, photo_key
        if self.cache_dir and photo_key and (self.cache_dir / f"{photo_key}.pt").is_file():
            self.memo = torch.load(self.cache_dir / f"{photo_key}.pt", weights_only=True)

    def finish(self) -> None:
        if self.cache_dir and self.photo and self.dirty:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.memo, self.cache_dir / f"{self.photo}.pt")
        self.dirty = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = "x".join(map(str, x.shape))
        if key not in self.memo:
            t = time.perf_counter()
            self.memo[key] = self.inner(x)
            self.seconds += time.perf_counter() - t
            self.dirty = True
        return self.memo[key]


def method_configs(heads: list[Path]) -> dict[str, models.ModelConfig]:
    base = models.get_config("effnet-lite0")
    out = {"norm": base}
    for h in heads:
        meta = h.with_suffix(".json")
        record = json.loads(meta.read_text()) if meta.is_file() else {}
        tag = record.get("target", h.stem)
        att = dataclasses.replace(base, score="attention", attention_weights=str(h.resolve()), score_threshold=None)
        out[f"attention {tag} {h.stem[-8:]}"] = att
        if record.get("score_threshold") is not None:
            out[f"attention {tag} {h.stem[-8:]} thr {record['score_threshold']:g}"] = dataclasses.replace(
                att, score_threshold=float(record["score_threshold"]))
    return out


def evaluate(feats: dict[str, LocalFeatures], queries: dict[str, set[str]]) -> dict[str, tuple[float, float]]:
    """{query: (AP of the vote ranking, AP after RANSAC re-ranking)}."""
    voter = ExactVoter(feats)
    shortlist = max(config.get("DELF_SHORTLIST"), TOP_K)
    neighbours, ratio = config.get("DELF_NEIGHBOURS"), config.get("DELF_RATIO")
    ransac_px, verified_score = config.get("DELF_RANSAC_PX"), config.get("DELF_VERIFIED_SCORE")
    out = {}
    for q, positives in queries.items():
        cands = voter.search(feats[q].desc, shortlist, neighbours, ratio, exclude=q)
        votes = [c["image_id"] for c in cands][:TOP_K]
        ranked = [m["image_id"] for m in rerank(feats[q], cands, ransac_px, verified_score)][:TOP_K]
        out[q] = (average_precision(votes, positives), average_precision(ranked, positives))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=str(landmarks_manifest()))
    p.add_argument("--heads", nargs="*", default=None,
                   help="attention head files (default: *-attention-*.pth in the package's weights/)")
    p.add_argument("--limit", type=int, default=0, help="only the first N photos (smoke test)")
    p.add_argument("--all-queries", action="store_true",
                   help="also rank the training-group queries (columns 'training groups' and 'all'; "
                        "doubles the ranking time)")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="keep the backbone's outputs per photo here and reuse them in later runs (the "
                        "s/photo column then shows the heads' cost only)")
    return p.parse_args(argv)


def extractors_sharing_one_backbone(configs: dict, feature_cache: str | None):
    """One extractor per method, all running the first one's backbone (SharedBackbone)."""
    extractors = {name: DelfExtractor(config=cfg, device="cpu") for name, cfg in configs.items()}
    first = next(iter(extractors.values()))
    shared = SharedBackbone(first.net.backbone, Path(feature_cache) if feature_cache else None)
    for ex in extractors.values():
        ex.net.backbone = shared
    return extractors, shared


def extract_all(extractors: dict, shared, ids: list[str], photos: list):
    """({method: {image id: features}}, {method: seconds of its own, the backbone left out})."""
    own = {name: 0.0 for name in extractors}
    feats: dict[str, dict[str, LocalFeatures]] = {name: {} for name in extractors}
    for n, (image_id, rgb) in enumerate(zip(ids, photos), 1):
        shared.start(hashlib.sha256(image_id.encode()).hexdigest()[:16])
        before = shared.seconds
        for name, ex in extractors.items():
            t = time.perf_counter()
            f = ex.extract(rgb)
            own[name] += time.perf_counter() - t
            feats[name][image_id] = LocalFeatures(f.locations.astype(np.float32), f.descriptors.astype(np.float32),
                                                  f.image_size)
        own[next(iter(extractors))] -= shared.seconds - before  # the first method paid for the backbone
        if n % 20 == 0:
            print(f"{n}/{len(photos)} photos", file=sys.stderr, flush=True)
    shared.finish()
    return feats, own


def print_table(results: dict, feats: dict, own: dict, backbone_s: float, n_photos: int,
                queries: dict, held_q: dict, train_q: dict, all_queries: bool) -> None:
    base = results["norm"]
    print(f"\nheld-out queries: {len(held_q)}; training-group queries: {len(train_q)}; all: {len(queries)}")
    print("| method | mAP held-out (votes) | mAP held-out (RANSAC) | vs norm, held-out (RANSAC) | "
          "mAP training groups (RANSAC) | mAP all (RANSAC) | features/photo | s/photo |")
    print("|---|---|---|---|---|---|---|---|")
    for name, aps in results.items():
        hv = np.mean([aps[q][0] for q in held_q])
        hr = np.mean([aps[q][1] for q in held_q])
        tr = np.mean([aps[q][1] for q in train_q]) if train_q and all_queries else float("nan")
        al = np.mean([aps[q][1] for q in queries]) if all_queries else float("nan")
        d = np.array([aps[q][1] - base[q][1] for q in held_q])
        vs = "-" if name == "norm" else (f"{d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f} "
                                         f"({int((d > 1e-9).sum())} up / {int((d < -1e-9).sum())} down)")
        nf = np.mean([len(f.desc) for f in feats[name].values()])
        sp = backbone_s + own[name] / n_photos
        print(f"| {name} | {hv:.3f} | {hr:.3f} | {vs} | {tr:.3f} | {al:.3f} | {nf:.0f} | {sp:.2f} |", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    manifest = Path(args.manifest)
    if not manifest.is_file():
        print(f"no manifest at {manifest} (set DELF_LANDMARKS_DIR or --manifest)", file=sys.stderr)
        return 1
    heads = [Path(h) for h in args.heads] if args.heads is not None else \
        sorted(models.WEIGHTS_DIR.glob("*-attention-*.pth"))
    rows = read_manifest(manifest)[: args.limit or None]
    ids = [rel.rsplit(".", 1)[0] for rel, _ in rows]
    groups = {i: g for i, (_, g) in zip(ids, rows)}
    train_groups, held_groups = split_groups(groups.values())
    queries = queries_and_positives(groups)
    held_q = {q: v for q, v in queries.items() if groups[q] in held_groups}
    train_q = {q: v for q, v in queries.items() if groups[q] in train_groups}
    photos = [decode_image((manifest.parent / rel).read_bytes(), ImageLimits.from_env()) for rel, _ in rows]
    torch.set_num_threads(torch.get_num_threads())

    configs = method_configs(heads)
    extractors, shared = extractors_sharing_one_backbone(configs, args.feature_cache)
    print(f"{len(photos)} photos indexed; queries: {len(held_q)} from {len(held_groups)} held-out groups "
          f"(+ {len(train_q)} from {len(train_groups)} training groups, reported apart); "
          f"torch threads {torch.get_num_threads()}; methods: {', '.join(configs)}", file=sys.stderr, flush=True)
    feats, own = extract_all(extractors, shared, ids, photos)
    backbone_s = shared.seconds / len(photos)

    results = {}
    ranked = queries if args.all_queries else held_q
    for name in configs:
        results[name] = evaluate(feats[name], ranked)
        print(f"ranked: {name}", file=sys.stderr, flush=True)
    print_table(results, feats, own, backbone_s, len(photos), queries, held_q, train_q, args.all_queries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
