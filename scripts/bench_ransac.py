#!/usr/bin/env python
"""Median time per verified pair: OpenCV USAC-MAGSAC (delf_verifier) vs scikit-image RANSAC.

Same synthetic correspondences for both (a known homography, ~50% outliers, 2 px
noise, a few hundred correspondences per pair like a DELF shortlist candidate);
skimage as in the DELF reference: AffineTransform, min_samples 3, max_trials 1000.

    python scripts/bench_ransac.py [--pairs 30] [--n 300]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from delf_verifier.ransac import project, verify

H_TRUE = np.array([[0.9, 0.08, 40.0], [-0.05, 1.05, 25.0], [2e-4, -1e-4, 1.0]])


def pairs(count, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        q = rng.uniform([0, 0], [800, 600], (n, 2))
        d = project(H_TRUE, q) + rng.normal(0, 2.0, (n, 2))
        out = rng.random(n) < 0.5
        d[out] = rng.uniform([0, 0], [800, 600], (int(out.sum()), 2))
        yield q.astype(np.float32), d.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    data = list(pairs(args.pairs, args.n))
    rows = []

    def bench(name, fn):
        times, inl = [], []
        for q, d in data:
            t = time.perf_counter()
            inl.append(fn(q, d))
            times.append((time.perf_counter() - t) * 1000)
        rows.append((name, float(np.median(times)), float(np.median(inl))))

    for px in (10.0, 20.0):
        bench(f"opencv MAGSAC homography {px:g}px",
              lambda q, d, px=px: verify(q, d, (800, 600), ransac_px=px).inliers)

        def sk(q, d, px=px):
            _, mask = ransac((q.astype(np.float64), d.astype(np.float64)), AffineTransform,
                             min_samples=3, residual_threshold=px, max_trials=1000,
                             rng=np.random.default_rng(0))
            return int(mask.sum()) if mask is not None else 0
        bench(f"skimage ransac affine {px:g}px", sk)

    base = {px: next(r[1] for r in rows if r[0].startswith("opencv") and f" {px:g}px" in r[0])
            for px in (10.0, 20.0)}
    print(f"{len(data)} pairs x {args.n} correspondences (50% outliers, 2 px noise)")
    print(f"{'method':38s} {'median ms/pair':>15s} {'x opencv':>9s} {'median inliers':>15s}")
    for name, ms, inl in rows:
        px = 10.0 if " 10px" in name else 20.0
        print(f"{name:38s} {ms:15.2f} {ms / base[px]:9.1f} {inl:15.0f}")


if __name__ == "__main__":
    main()
