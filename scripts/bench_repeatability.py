#!/usr/bin/env python
"""Repeatability of DELF keypoints under known homographies, on scikit-image's sample photos.

For each photo and seed, `tests/photos.warped_query` makes a warped, cropped, brightened
copy with its ground-truth homography; both are extracted and the figures of
`tests/test_extractor_quality.repeatability` are printed:

    a  fraction of the query's keypoints (projecting inside the original) that land within
       one feature stride (16 px x the keypoint's scale mapped through H) of a keypoint of
       the original at a scale within one pyramid step;
    b  among those, the fraction whose nearest descriptor in the original lies within that
       radius;
    ctrl_a / ctrl_b  the same with a wrong H (a half turn about the centre) - the chance level.

Usage: python scripts/bench_repeatability.py [--model effnet-lite0] [--seeds 0 1 2] [--photos ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from photos import SAMPLE_PHOTOS, sample_photo, warped_query  # noqa: E402 - after the sys.path / environment setup above
from test_extractor_quality import repeatability, rotated_180  # noqa: E402 - after the sys.path / environment setup above

from delf_extractor.extract import DelfExtractor  # noqa: E402 - after the sys.path / environment setup above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--photos", nargs="+", default=list(SAMPLE_PHOTOS))
    args = ap.parse_args()

    ext = DelfExtractor(args.model, device=args.device)
    print(f"model {args.model}, device {ext.device}")
    print(f"{'photo':22s} {'seed':>4s} {'n_q':>5s} {'inside':>6s} {'a':>6s} {'b':>6s} "
          f"{'ctrl_a':>6s} {'ctrl_b':>6s} {'s':>5s}")
    all_a, all_b = [], []
    for name in args.photos:
        rgb = sample_photo(name)
        size = (rgb.shape[1], rgb.shape[0])
        f0 = ext.extract(rgb)
        for seed in args.seeds:
            query, H = warped_query(rgb, seed)
            t = time.perf_counter()
            fq = ext.extract(query)
            dt = time.perf_counter() - t
            r = repeatability(f0, fq, H, size)
            c = repeatability(f0, fq, rotated_180(H, size), size)
            all_a.append(r["a"])
            all_b.append(r["b"])
            print(f"{name:22s} {seed:4d} {len(fq):5d} {r['inside']:6.2f} {r['a']:6.3f} {r['b']:6.3f} "
                  f"{c['a']:6.3f} {c['b']:6.3f} {dt:5.2f}", flush=True)
    print(f"{'mean':22s} {'':4s} {'':5s} {'':6s} {np.mean(all_a):6.3f} {np.mean(all_b):6.3f}")


if __name__ == "__main__":
    main()
