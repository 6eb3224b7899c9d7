#!/usr/bin/env python
"""Which verification gate and which correspondences rank landmarks-dev best?

Extracts every photo once with the default extractor (cached in --cache), then for
each query (photos whose group has another) runs exact numpy kNN over all other
photos' descriptors, the indexer's ratio-test voting (11 neighbours, 0.9) and
50-image shortlist, and the verifier's RANSAC (delf_verifier.ransac.verify, 16 px).
Rankings compared: votes only; verified (inliers >= gate) by inliers, then the rest
by votes, for several gates; correspondences from every fetched neighbour (what
the indexer returns) or from voting neighbours only. Prints mAP and top-1.

Exact kNN isolates the ranking rule from Milvus' approximate search.

    .venv/bin/python scripts/bench_ranking.py [--photos DIR] [--cache PATH]
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from delf_common.evaluation import average_precision, read_manifest
from delf_common.images import decode_image
from delf_verifier.ransac import verify

REPO = Path(__file__).resolve().parents[1]
K, RATIO, SHORTLIST, RANSAC_PX = 11, 0.9, 50, 16.0
GATES = (8, 12, 16, 20, 25, 30, 40)


def features(root: Path, rows, cache: Path):
    if not cache.exists():
        from delf_extractor.extract import DelfExtractor

        ex = DelfExtractor()
        loc, desc, owner, size = [], [], [], []
        for k, (path, _) in enumerate(rows):
            f = ex.extract(decode_image((root / path).read_bytes()))
            loc.append(f.locations), desc.append(f.descriptors), owner.append(np.full(len(f), k))
            size.append(f.image_size)
        np.savez(cache, L=np.concatenate(loc), D=np.concatenate(desc), I=np.concatenate(owner), S=np.array(size))
    z = np.load(cache)
    return z["L"], z["D"], z["I"], z["S"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "landmarks-dev")
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-bench-ranking.npz"))
    args = p.parse_args()
    rows = read_manifest(args.photos / "MANIFEST.tsv")
    L, D, I, S = features(args.photos, rows, args.cache)
    groups = [g for _, g in rows]
    sizes = Counter(groups)
    per_query = []
    for q in (q for q in range(len(rows)) if sizes[groups[q]] >= 2):
        mine = I == q
        qd, ql = D[mine], L[mine]
        dd, dl, di = D[~mine], L[~mine], I[~mine]
        dist = np.sqrt(np.maximum(2 - 2 * qd @ dd.T, 0))
        nn = np.argpartition(dist, K, axis=1)[:, :K]
        nd = np.take_along_axis(dist, nn, 1)
        order = np.argsort(nd, 1)
        nn, nd = np.take_along_axis(nn, order, 1), np.take_along_axis(nd, order, 1)
        votes, corr = Counter(), {"all": {}, "vote": {}}
        for a in range(len(qd)):
            bar, voted = RATIO * nd[a, -1], set()
            for j in range(K):
                img = di[nn[a, j]]
                corr["all"].setdefault(img, {}).setdefault(a, dl[nn[a, j]])
                if j < K - 1 and nd[a, j] < bar and img not in voted:
                    voted.add(img)
                    votes[img] += 1
                    corr["vote"].setdefault(img, {}).setdefault(a, dl[nn[a, j]])
        shortlist = [i for i, _ in votes.most_common(SHORTLIST)]
        inliers = {}
        for rule, by_image in corr.items():
            for img in shortlist:
                c = by_image.get(img, {})
                idx = np.array(sorted(c), int)
                inliers[rule, img] = 0 if len(idx) < 3 else verify(
                    ql[idx], np.array([c[i] for i in idx]), S[q], None, min_inliers=0, ransac_px=RANSAC_PX).inliers
        positives = {i for i in range(len(rows)) if groups[i] == groups[q] and i != q}
        per_query.append((shortlist, votes, inliers, positives))

    def evaluate(rule: str | None, gate: int = 0) -> tuple[float, float]:
        aps, top1 = [], []
        for shortlist, votes, inliers, positives in per_query:
            ranked = shortlist if rule is None else sorted(shortlist, reverse=True, key=lambda i: (
                inliers[rule, i] >= gate, inliers[rule, i] if inliers[rule, i] >= gate else votes[i], votes[i]))
            aps.append(average_precision(ranked, positives))
            top1.append(bool(ranked) and ranked[0] in positives)
        return float(np.mean(aps)), float(np.mean(top1))

    print(f"{len(rows)} photos, {len(per_query)} queries, exact kNN, shortlist {SHORTLIST}, RANSAC {RANSAC_PX} px")
    print("| ranking | correspondences | mAP | top-1 |\n|---|---|---|---|")
    print("| votes only | - | %.3f | %.3f |" % evaluate(None))
    for rule in ("all", "vote"):
        for gate in GATES:
            print(f"| gate {gate} | {rule} | %.3f | %.3f |" % evaluate(rule, gate))


if __name__ == "__main__":
    main()
