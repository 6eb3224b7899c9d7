#!/usr/bin/env python
"""Does a DELG-style hybrid (global shortlist merged with the local votes) rank better?

Issue 4 welcomes a hybrid "if it measures better". This measures it offline, with the
pieces the system uses, before anyone builds it into the services:

* local features: the default extractor, the 500 best-scored query descriptors
  (DELF_QUERY_FEATURES), exact kNN voting as the indexer did then (11 neighbours, ratio 0.9,
  shortlist 50; `ExactVoter`), the verifier's RANSAC and the shipped verification rule
  (8 px, 25 inliers and 15% of the correspondences);
* global descriptor: `delf eval`'s global-gem baseline (EfficientNet-Lite0 head, GeM p=3,
  3 scales), exact cosine over all photos.

Rankings compared (every photo whose group has another is a query, itself left out):

* `local` (shipped): verified by inliers, then the unverified shortlist by votes;
* `global`: GeM cosine alone;
* `hybrid shortlist`: the local shortlist plus the global top N (DELG's idea); each global
  candidate gets its correspondences from a kNN restricted to the global candidates (what a
  filtered search in the indexer would return) and is verified; verified by inliers, then
  the local unverified by votes, then the other photos in global order;
* `hybrid + rank fusion`: as above, but unverified photos ranked by w / (k0 + vote rank) +
  1 / (k0 + global rank) (reciprocal-rank fusion), over a small grid of w and k0. The grid is
  tuned on the same photos it is scored on, so its best row is optimistic.

Features are cached in --cache (delete it to recompute).

    .venv/bin/python scripts/bench_hybrid.py [--photos DIR] [--global-top 20]
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from delf_tools.eval_local import ExactVoter, LocalFeatures
from delf_tools.eval_methods import GemExtractor
from delf_tools.eval_set import load_rgb
from delf_tools.evaluation import average_precision, read_manifest
from delf_common.images import ImageLimits, decode_image
from delf_verifier.ransac import verify

REPO = Path(__file__).resolve().parents[1]
K, RATIO, SHORTLIST, QUERY_FEATURES = 11, 0.9, 50, 500
MIN_INLIERS, MIN_SHARE, RANSAC_PX = 25, 0.15, 8.0


def features(root: Path, rows, cache: Path):
    if not cache.exists():
        from delf_extractor.extract import DelfExtractor

        ex, gem = DelfExtractor(), GemExtractor()
        loc, desc, score, owner, glob, size = [], [], [], [], [], []
        for k, (path, _) in enumerate(rows):
            rgb = decode_image((root / path).read_bytes(), ImageLimits.from_env())
            f = ex.extract(rgb)
            loc.append(f.locations), desc.append(f.descriptors), score.append(f.scores)
            owner.append(np.full(len(f), k)), size.append(f.image_size)
            glob.append(gem(load_rgb(root / path)))
            if (k + 1) % 20 == 0:
                print(f"features: {k + 1}/{len(rows)} photos", flush=True)
        np.savez(cache, L=np.concatenate(loc), D=np.concatenate(desc), S=np.concatenate(score),
                 I=np.concatenate(owner), G=np.stack(glob), Z=np.array(size))
    z = np.load(cache)
    return z["L"], z["D"], z["S"], z["I"], z["G"], z["Z"]


def restricted_candidates(voter: ExactVoter, qd: np.ndarray, allowed: list[int]) -> dict[int, dict]:
    """kNN over the allowed photos only (a filtered search): each one's correspondences."""
    rows = np.nonzero(np.isin(voter.owner, allowed))[0]
    d2 = (qd ** 2).sum(1)[:, None] + voter.sq[rows][None] - 2.0 * qd @ voter.desc[rows].T
    k = min(K, d2.shape[1])
    part = np.argpartition(d2, k - 1, 1)[:, :k]
    near: dict[int, dict[int, tuple[float, int]]] = {}
    for qi in range(len(qd)):
        for j in part[qi]:
            r = int(rows[j])
            img, d = int(voter.owner[r]), float(d2[qi, j])
            best = near.setdefault(img, {})
            if qi not in best or d < best[qi][0]:
                best[qi] = (d, r)
    return {img: {"query_idx": np.array(sorted(b), np.int64), "db_xy": voter.xy[[b[i][1] for i in sorted(b)]]}
            for img, b in near.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "landmarks-dev")
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-bench-hybrid.npz"))
    p.add_argument("--global-top", type=int, default=20)
    return p.parse_args()


def verdicts(cands: dict[int, dict], ql: np.ndarray, size) -> dict[int, tuple[int, bool]]:
    """{candidate: (RANSAC inliers, verified)}."""
    verdict = {}
    for k, c in cands.items():
        m = len(c["query_idx"])
        inl = 0 if m < 3 else verify(ql[c["query_idx"]], c["db_xy"], size, None,
                                     min_inliers=0, ransac_px=RANSAC_PX).inliers
        verdict[k] = (inl, inl >= MIN_INLIERS and inl >= MIN_SHARE * m)
    return verdict


def verify_shortlists(voter, feats, ids, S, I, sims, queries, global_top: int):  # noqa: E741 - I: kNN indices
    """Per query: local candidates and the global extras, each verified once.
    ({query: (local candidates, verdicts, global order)}, extras added, extras verified)."""
    per_query = {}
    added, added_verified = 0, 0
    for q in queries:
        qf = feats[ids[q]]
        keep = np.sort(np.argsort(-S[I == q], kind="stable")[:QUERY_FEATURES])
        ql, qd = qf.xy[keep], qf.desc[keep]
        local = {int(c["image_id"]): c for c in voter.search(qd, SHORTLIST, K - 1, RATIO, exclude=ids[q])}
        order = [int(k) for k in np.argsort(-sims[q]) if k != q]
        extra = [k for k in order[: global_top] if k not in local]
        cands = dict(local)
        if extra:
            cands.update({k: {**c, "votes": 0} for k, c in restricted_candidates(voter, qd, extra).items()})
        verdict = verdicts(cands, ql, qf.size)
        added += len(extra)
        added_verified += sum(verdict[k][1] for k in extra if k in verdict)
        per_query[q] = (local, verdict, order)
    return per_query, added, added_verified


def local_rank(per_query, q):
    local, verdict, _ = per_query[q]
    ver = sorted((k for k in local if verdict[k][1]), key=lambda k: (-verdict[k][0], k))
    return ver + sorted((k for k in local if not verdict[k][1]), key=lambda k: (-local[k]["votes"], k))


def global_rank(per_query, q):
    return per_query[q][2]


def hybrid_rank(per_query, q, w=None, k0=10):
    local, verdict, order = per_query[q]
    ver = sorted((k for k in verdict if verdict[k][1]), key=lambda k: (-verdict[k][0], k))
    rest_local = sorted((k for k in local if k not in ver), key=lambda k: (-local[k]["votes"], k))
    rest_global = [k for k in order if k not in ver]
    if w is None:
        return ver + rest_local + [k for k in rest_global if k not in set(rest_local)]
    vote_rank = {k: r for r, k in enumerate(rest_local)}
    fused = {k: w / (k0 + vote_rank.get(k, 10 ** 6)) + 1.0 / (k0 + r) for r, k in enumerate(rest_global)}
    return ver + sorted(fused, key=lambda k: (-fused[k], k))


def main() -> None:
    args = parse_args()
    if not (args.photos / "MANIFEST.tsv").is_file():
        raise SystemExit(f"no MANIFEST.tsv in {args.photos}")
    rows = read_manifest(args.photos / "MANIFEST.tsv")
    L, D, S, I, G, Z = features(args.photos, rows, args.cache)  # noqa: E741 - I: each row's photo
    n = len(rows)
    ids = [str(k) for k in range(n)]
    feats = {ids[k]: LocalFeatures(L[I == k], D[I == k], tuple(int(v) for v in Z[k])) for k in range(n)}
    voter = ExactVoter(feats)
    groups = [g for _, g in rows]
    sizes = Counter(groups)
    queries = [q for q in range(n) if sizes[groups[q]] >= 2]
    positives = {q: {k for k in range(n) if groups[k] == groups[q] and k != q} for q in queries}
    sims = G @ G.T
    per_query, added, added_verified = verify_shortlists(voter, feats, ids, S, I, sims, queries, args.global_top)

    def score(rank) -> tuple[float, float]:
        aps, top1 = [], []
        for q in queries:
            ranked = rank(per_query, q)
            aps.append(average_precision(ranked, positives[q]))
            top1.append(bool(ranked) and ranked[0] in positives[q])
        return float(np.mean(aps)), float(np.mean(top1))

    print(f"{len(queries)} queries; global top {args.global_top} added {added} candidates outside the "
          f"local shortlists, {added_verified} of them verified")
    print("| ranking | mAP | top-1 |")
    print("|---|---|---|")
    for name, rank in [("local (shipped)", local_rank), ("global GeM", global_rank),
                       (f"hybrid shortlist (local + global top {args.global_top})", hybrid_rank)]:
        m, t = score(rank)
        print(f"| {name} | {m:.3f} | {t:.3f} |")
    for w in (0.5, 1.0, 2.0):
        for k0 in (1, 10, 60):
            m, t = score(lambda per_query, q: hybrid_rank(per_query, q, w, k0))  # noqa: B023 - called at once, inside the loop
            print(f"| hybrid + rank fusion w={w:g} k0={k0} (tuned on these photos) | {m:.3f} | {t:.3f} |")


if __name__ == "__main__":
    main()
