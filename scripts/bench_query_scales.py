#!/usr/bin/env python
"""Query-side pyramid levels: does a search query need the top (1.41) level?

Extracts every landmarks-dev photo with the default preset (the index), then again with
query-side variants, and ranks every query (photos whose group has another) with exact
kNN voting (ExactVoter, 11-NN, ratio 0.9, shortlist 50) over the full-level index, the
500 best-scored query descriptors (DELF_QUERY_FEATURES) and the shipped verification
rule (8 px MAGSAC, 25 inliers and 15% of the correspondences). Prints median seconds
per query extraction, mAP and top-1 per variant. Motivates DELF_QUERY_MAX_SCALE.

    .venv/bin/python scripts/bench_query_scales.py [--photos DIR]
"""
import argparse
import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np

from delf_tools.eval_local import ExactVoter, LocalFeatures
from delf_tools.evaluation import average_precision, read_manifest
from delf_common.images import ImageLimits, decode_image
from delf_extractor import models
from delf_extractor.extract import DelfExtractor
from delf_verifier.ransac import verify

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "landmarks-dev")
root = p.parse_args().photos
if not (root / "MANIFEST.tsv").is_file():
    raise SystemExit(f"no MANIFEST.tsv in {root}")
print("| query variant | s/query extraction (median) | mAP | top-1 | queries |")
print("|---|---|---|---|---|")

rows = read_manifest(root / "MANIFEST.tsv")
cfg = models.get_config()
variants = {"every level (default)": cfg, "levels <= 1.0": dataclasses.replace(cfg, scales=tuple(s for s in cfg.scales if s <= 1.0 + 1e-6)),
            "max side 768": dataclasses.replace(cfg, max_image_side=768)}
feats = {}
times = {}
for name, c in variants.items():
    ex = DelfExtractor(config=c)
    out, ts = [], []
    for path, _ in rows:
        img = decode_image((root / path).read_bytes(), ImageLimits.from_env())
        t = time.perf_counter()
        f = ex.extract(img)
        ts.append(time.perf_counter() - t)
        out.append(f)
    feats[name] = out
    times[name] = float(np.median(ts))
full = feats["every level (default)"]
voter = ExactVoter({str(i): LocalFeatures(f.locations, f.descriptors, tuple(f.image_size)) for i, f in enumerate(full)})
groups = [g for _, g in rows]
sizes = Counter(groups)
queries = [q for q in range(len(rows)) if sizes[groups[q]] >= 2]
for name in variants:
    aps, top1 = [], []
    for q in queries:
        f = feats[name][q]
        keep = np.sort(np.argsort(-f.scores, kind="stable")[:500])
        ql, qd = f.locations[keep], f.descriptors[keep]
        cands = voter.search(qd, 50, 10, 0.9, exclude=str(q))
        scored = []
        for c in cands:
            n = len(c["query_idx"])
            inl = 0 if n < 3 else verify(ql[c["query_idx"]], c["db_xy"], f.image_size, None, min_inliers=0, ransac_px=8.0).inliers
            ver = inl >= 25 and inl >= 0.15 * n
            scored.append((c["image_id"], ver, inl, c["votes"]))
        ranked = [i for i, *_ in sorted(scored, key=lambda t: (0 if t[1] else 1, -t[2] if t[1] else -t[3], -t[3] if t[1] else -t[2], t[0]))]
        pos = {str(i) for i in range(len(rows)) if groups[i] == groups[q] and i != q}
        aps.append(average_precision(ranked, pos))
        top1.append(bool(ranked) and ranked[0] in pos)
    print(f"| {name} | {times[name]:.3f} | {np.mean(aps):.3f} | {np.mean(top1):.3f} | {len(queries)} |", flush=True)
