#!/usr/bin/env python
"""Speed and retrieval quality of extractor settings on landmarks-dev (CPU).

For each candidate setting (max image side, pyramid scales) of a model preset:
wall seconds per photo (median and mean over the set; torch threads = the machine's
cores), process CPU seconds per photo (less sensitive to other load on the machine), and
mAP of brute-force kNN voting: every query descriptor takes its 11 nearest
database descriptors over all other photos; neighbour j <= 10 votes for its photo
if dist_j < 0.9 * dist_11 (one vote per query descriptor per photo); photos are
ranked by votes. Queries: photos whose group has >= 2 photos; positives: the other
photos of the group; AP over the full ranking (ties broken by manifest order).

    python scripts/bench_extractor.py [--model effnet-lite0] [--limit N] [--settings NAME ...]

Photos: $DELF_LANDMARKS_DIR or ../shared/data/landmarks-dev (MANIFEST.tsv: path, group).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from delf_common.images import ImageLimits, decode_image
from delf_extractor.extract import DelfExtractor
from delf_extractor.models import DELF_SCALES, get_config

SETTINGS = {
    # name: (max_image_side, scales)
    "1024-s7 (DELF 0.25-2.0)": (1024, DELF_SCALES),
    "1024-s5 (0.25-1.0)": (1024, DELF_SCALES[:5]),
    "1024-s6 (0.25-1.41)": (1024, DELF_SCALES[:6]),
    "1024-s5 (0.35-1.41)": (1024, DELF_SCALES[1:6]),
    "1024-s3 (0.5-1.0)": (1024, DELF_SCALES[2:5]),
    "768-s6 (0.25-1.41)": (768, DELF_SCALES[:6]),
    "768-s5 (0.35-1.41)": (768, DELF_SCALES[1:6]),
    "512-s7 (0.25-2.0)": (512, DELF_SCALES),
}


def landmarks_dir() -> Path:
    env = os.environ.get("DELF_LANDMARKS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/landmarks-dev"


def load_manifest(folder: Path) -> tuple[list[Path], list[str]]:
    with open(folder / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [folder / r["path"] for r in rows], [r["group"] for r in rows]


def knn_vote_map(descs: list[np.ndarray], groups: list[str], k: int = 10, ratio: float = 0.9) -> float:
    owner = np.concatenate([np.full(len(d), i) for i, d in enumerate(descs)])
    db = torch.from_numpy(np.concatenate(descs))
    owner_t = torch.from_numpy(owner)
    n = len(descs)
    group_size = {g: groups.count(g) for g in groups}
    aps = []
    for q in range(n):
        if group_size[groups[q]] < 2:
            continue
        votes = np.zeros(n)
        qd = torch.from_numpy(descs[q])
        for chunk in torch.split(qd, 256):
            sim = chunk @ db.T
            sim[:, owner_t == q] = -2.0
            top_sim, top_idx = torch.topk(sim, k + 1, dim=1)
            dist = torch.sqrt(torch.clamp(2 - 2 * top_sim, min=0))
            ok = dist[:, :k] < ratio * dist[:, k:k + 1]
            photo = owner_t[top_idx[:, :k]]
            for row_ok, row_photo in zip(ok.numpy(), photo.numpy()):
                votes[np.unique(row_photo[row_ok])] += 1
        order = sorted((i for i in range(n) if i != q), key=lambda i: -votes[i])  # stable: manifest order
        rel = np.array([groups[i] == groups[q] for i in order])
        hits = np.cumsum(rel)
        aps.append(float((hits[rel] / (np.flatnonzero(rel) + 1)).mean()))
    return float(np.mean(aps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="effnet-lite0")
    p.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    p.add_argument("--settings", nargs="*", default=None, help="subset of setting names (prefix match)")
    args = p.parse_args(argv)
    folder = landmarks_dir()
    if not (folder / "MANIFEST.tsv").is_file():
        print(f"no landmarks-dev at {folder} (set DELF_LANDMARKS_DIR)", file=sys.stderr)
        return 1
    paths, groups = load_manifest(folder)
    if args.limit:
        paths, groups = paths[:args.limit], groups[:args.limit]
    photos = [decode_image(p.read_bytes(), ImageLimits.from_env()) for p in paths]
    base = get_config(args.model)
    names = [n for n in SETTINGS if not args.settings or any(n.startswith(s) for s in args.settings)]
    print(f"{len(photos)} photos, {len(set(groups))} groups, torch threads {torch.get_num_threads()}, "
          f"model {base.name}", flush=True)
    print("| setting | wall s/photo (median) | wall s/photo (mean) | CPU s/photo (mean) | features/photo | mAP |\n|---|---|---|---|---|---|", flush=True)
    for name in names:
        side, scales = SETTINGS[name]
        cfg = dataclasses.replace(base, max_image_side=side, scales=tuple(scales))
        ex = DelfExtractor(config=cfg, device="cpu")
        ex.extract(photos[0])  # warm-up
        times, cpu, descs = [], [], []
        for img in photos:
            t, c = time.perf_counter(), time.process_time()
            f = ex.extract(img)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            descs.append(f.descriptors)
        m = knn_vote_map(descs, groups)
        print(f"| {name} | {np.median(times):.2f} | {np.mean(times):.2f} | {np.mean(cpu):.2f} | "
              f"{np.mean([len(d) for d in descs]):.0f} | {m:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
