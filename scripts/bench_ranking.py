#!/usr/bin/env python
"""Which verification rule ranks landmarks-dev best, and how often is "verified" wrong?

Extracts every photo once with the default extractor (cached in --cache), then for
each query (photos whose group has another) runs exact numpy kNN over all other
photos' descriptors, ratio-test voting (11 neighbours, 0.9: the indexer's default when the
rule was chosen; it fetches DELF_NEIGHBOURS + 1 = 21 since 2026-11-30) and
50-image shortlist, and the verifier's RANSAC (delf_verifier.ransac.verify).
Rankings compared: votes only; verified first by inliers, then the rest by votes,
where verified = inliers >= gate and inliers >= ratio x correspondences, for several
RANSAC thresholds, gates and ratios. Correspondences: every fetched neighbour (what
the indexer returns) or voting neighbours only. Prints mAP, top-1 and the number of
shortlisted photos of other groups that were "verified" (false verifications).

Exact kNN isolates the ranking rule from Milvus' approximate search.

    .venv/bin/python scripts/bench_ranking.py [--photos DIR] [--cache PATH]
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from delf_tools.eval_local import ExactVoter, LocalFeatures
from delf_tools.evaluation import average_precision, read_manifest
from delf_common.images import ImageLimits, decode_image
from delf_verifier.ransac import verify

REPO = Path(__file__).resolve().parents[1]
K, RATIO, SHORTLIST = 11, 0.9, 50
THRESHOLDS_PX = (8.0, 16.0)
GATES = (12, 20, 25, 30)
SHARES = (0.0, 0.15)


def features(root: Path, rows, cache: Path):
    if not cache.exists():
        from delf_extractor.extract import DelfExtractor

        ex = DelfExtractor()
        loc, desc, owner, size = [], [], [], []
        for k, (path, _) in enumerate(rows):
            f = ex.extract(decode_image((root / path).read_bytes(), ImageLimits.from_env()))
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
    L, D, I, S = features(args.photos, rows, args.cache)  # noqa: E741 - I: each row's photo, as features() names it
    ids = [str(k) for k in range(len(rows))]
    voter = ExactVoter({i: LocalFeatures(L[I == int(i)], D[I == int(i)], tuple(S[int(i)])) for i in ids})
    groups = [g for _, g in rows]
    sizes = Counter(groups)
    per_query = []
    for q in (q for q in range(len(rows)) if sizes[groups[q]] >= 2):
        ql, qd = L[I == q], D[I == q]
        corr = {rule: {c["image_id"]: c for c in voter.search(qd, SHORTLIST, K - 1, RATIO, exclude=str(q),
                                                             voting_only=(rule == "vote"))}
                for rule in ("all", "vote")}
        shortlist = list(corr["all"])
        votes = {i: c["votes"] for i, c in corr["all"].items()}
        inliers = {}  # (rule, px, image) -> (inliers, correspondences)
        for rule, by_image in corr.items():
            for img in shortlist:
                c = by_image[img]
                for px in THRESHOLDS_PX:
                    inliers[rule, px, img] = (0 if len(c["query_idx"]) < 3 else verify(
                        ql[c["query_idx"]], c["db_xy"], S[q], None, min_inliers=0, ransac_px=px).inliers,
                        len(c["query_idx"]))
        positives = {str(i) for i in range(len(rows)) if groups[i] == groups[q] and i != q}
        per_query.append((shortlist, votes, inliers, positives))

    def evaluate(rule: str | None, px: float = 0, gate: int = 0, share: float = 0) -> tuple[float, float, int]:
        aps, top1, false_verified = [], [], 0
        for shortlist, votes, inliers, positives in per_query:
            def verified(i) -> bool:
                n_in, n_corr = inliers[rule, px, i]  # noqa: B023 - called at once, inside the loop
                return n_in >= gate and n_in >= share * n_corr
            ranked = shortlist if rule is None else sorted(shortlist, reverse=True, key=lambda i: (
                verified(i), inliers[rule, px, i][0] if verified(i) else votes[i], votes[i]))
            aps.append(average_precision(ranked, positives))
            top1.append(bool(ranked) and ranked[0] in positives)
            if rule is not None:
                false_verified += sum(1 for i in shortlist if verified(i) and i not in positives)
        return float(np.mean(aps)), float(np.mean(top1)), false_verified

    print(f"{len(rows)} photos, {len(per_query)} queries, exact kNN, shortlist {SHORTLIST}")
    print("| ranking | correspondences | RANSAC px | gate | inlier share | mAP | top-1 | false verified |")
    print("|---|---|---|---|---|---|---|---|")
    print("| votes only | - | - | - | - | %.3f | %.3f | - |" % evaluate(None)[:2])
    for rule in ("all", "vote"):
        for px in THRESHOLDS_PX:
            for gate in GATES:
                for share in SHARES:
                    print(f"| verified first | {rule} | {px:g} | {gate} | {share:g} | %.3f | %.3f | %d |"
                          % evaluate(rule, px, gate, share))


if __name__ == "__main__":
    main()
