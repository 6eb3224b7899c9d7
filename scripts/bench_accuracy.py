#!/usr/bin/env python
"""The accuracy lab: landmarks-dev and landmarks-hard searched outside the system, exactly
and deterministically, to compare ranking, verification and expansion rules per set and
per condition before a change goes through `delf eval` on the running system.

Every photo is extracted once by the shipped extractor (cached per model in --cache), keeps
its DELF_STORED_FEATURES best-scored descriptors as the indexer does, and is searched by
its indexed features (as `delf eval` searches by id): exact numpy kNN over every other
photo of both sets (the sets are each other's real distractors; the other set's photos of a
place shown in both, ``real_distractors.SAME_PLACE_GROUPS``, are junk for its queries: neither
positives nor errors, as the photos were alone), the indexer's voting
(``delf_indexer.voting.vote``), the gateway's shortlist, the verifier's plane model
(``fit_plane``) and a fundamental matrix (``fit_epipolar``), and ranking rules: the former
one, the shipped score (``delf_common.ranking``) and others. Exact kNN takes Milvus' approximation out of the comparison:
figures here are not the system's, their differences are what count.

    .venv/bin/python scripts/bench_accuracy.py [--neighbours 10 20] [--conditions] [--fit]
                                               [--bytes-vs-id] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from real_distractors import SAME_PLACE_GROUPS  # noqa: E402 - one list of the places both sets show

DATA = REPO.parent / "shared" / "data"
SETS = ("landmarks-dev", "landmarks-hard")
# Groups of the two sets that show the same place (one group when the sets are pooled; `metrics`
# leaves the other set's photos of it out of a query's figures).
SAME_PLACE = {f"landmarks-hard/{h}": f"landmarks-dev/{d}" for h, d in SAME_PLACE_GROUPS.items()}


def pooled(data: dict) -> dict:
    """Both sets as one collection, each the other's real distractors: ids and groups
    prefixed by their set, the groups of ``SAME_PLACE`` merged."""
    out = {}
    for s, feats in data.items():
        for i, (g, c, f) in feats.items():
            group = f"{s}/{g}"
            out[f"{s}/{i}"] = (SAME_PLACE.get(group, group), c, f)
    return out


def clahe(rgb: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness (OpenCV, clip 2,
    8x8 tiles): dark and backlit regions get local contrast, colours keep their hue."""
    import cv2

    lab = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


PHOTOMETRIC = {"": lambda rgb: rgb, "clahe": clahe}


def extract_set(root: Path, cache: Path, model: str | None, variant: str = "", stored: int = 0) -> dict:
    """{image_id: (group, condition, LocalFeatures)} of one set, extracted once (cached);
    with ``stored``, each photo keeps only its ``stored`` best-scored descriptors (as the
    indexer does with DELF_STORED_FEATURES below the cache's)."""
    from delf_common import config
    from delf_common.images import ImageLimits, decode_image
    from delf_tools.eval_local import LocalFeatures
    from delf_tools.eval_set import load_photos

    photos = load_photos(root / "MANIFEST.tsv")
    dark = float(config.get("DELF_DARK_LIGHTNESS"))  # the extractor lifts photos below it
    name = (f"{root.name}-{model or config.get('DELF_MODEL')}{('-' + variant) if variant else ''}"
            f"{f'-dark{dark:g}' if dark else ''}.npz")
    path = cache / name
    if not path.exists():
        from delf_extractor.extract import DelfExtractor

        ex = DelfExtractor(model)
        keep = int(config.get("DELF_STORED_FEATURES"))
        parts = {k: [] for k in "LDISCO"}
        t = time.monotonic()
        for k, p in enumerate(photos):
            f = ex.extract(PHOTOMETRIC[variant](decode_image(p.path.read_bytes(), ImageLimits.from_env()))).best(keep)
            parts["L"].append(f.locations), parts["D"].append(f.descriptors)
            parts["I"].append(np.full(len(f), k)), parts["S"].append(np.array([f.image_size]))
            parts["C"].append(f.scales), parts["O"].append(f.scores)
        print(f"{root.name}: {len(photos)} photos extracted in {time.monotonic() - t:.0f} s", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: np.concatenate(v) for k, v in parts.items()})
    z = np.load(path)
    out = {}
    for k, p in enumerate(photos):
        m = np.flatnonzero(z["I"] == k)
        m = m[np.argsort(-z["O"][m], kind="stable")[: stored or None]]
        out[p.image_id] = (p.group, p.condition, LocalFeatures(
            z["L"][m].astype(np.float32), z["D"][m].astype(np.float32),
            tuple(int(v) for v in z["S"][k]), z["C"][m].astype(np.float32)))
    return out



def candidates(feats: dict, shortlist: int, neighbours: int, ratio: float) -> dict:
    """{query id: the voter's candidates} for every query of the pooled photos."""
    from delf_tools.eval_local import ExactVoter
    from delf_tools.evaluation import queries_and_positives

    voter = ExactVoter({i: f[2] for i, f in feats.items()})
    queries = queries_and_positives({i: f[0] for i, f in feats.items()})
    return {q: voter.search(feats[q][2].desc, shortlist, neighbours, ratio, exclude=q) for q in queries}


def geometry(feats: dict, cands: dict, ransac_px: float, epipolar_px: tuple[float, ...]) -> dict:
    """{query: [{image_id, votes, n, inliers, model, epi: {px: inliers}} per candidate]}."""
    from delf_verifier.ransac import box_corners, fit_epipolar, fit_plane

    out = {}
    for q, cs in cands.items():
        f = feats[q][2]
        corners = box_corners(f.size)
        rows = []
        for c in cs:
            src = np.ascontiguousarray(f.xy[c["query_idx"]], np.float32)
            dst = np.ascontiguousarray(c["db_xy"], np.float32)
            _, model, mask = fit_plane(src, dst, corners, ransac_px)
            epi = {}
            for px in epipolar_px:
                m = fit_epipolar(src, dst, px)
                epi[px] = int(m.sum()) if m is not None else 0
            rows.append({"image_id": c["image_id"], "votes": c["votes"], "n": len(src),
                         "inliers": int(mask.sum()) if mask is not None else 0, "model": model, "epi": epi,
                         "nq": len(f.xy)})
        out[q] = rows
    return out


def metrics(rankings: dict, groups: dict, conditions: dict, pooled_sets: bool = False) -> dict:
    """mAP, P@1, R@10 overall and per condition (of the query). ``pooled_sets`` (ids
    prefixed by their set): a photo of the query's place from the other set is junk, left
    out of the ranking and of the positives (Oxford's rule), so each query has the positives
    it has in its own set and the figure differs from the set's alone by the distractors."""
    from delf_tools.evaluation import average_precision

    per = {}
    for q, ranked in rankings.items():
        pos = {i for i, g in groups.items() if g == groups[q] and i != q}
        if pooled_sets:
            junk = {i for i in pos if i.split("/", 1)[0] != q.split("/", 1)[0]}
            pos -= junk
            ranked = [i for i in ranked if i not in junk]
        ap = average_precision(ranked, pos)
        p1 = float(bool(ranked) and ranked[0] in pos)
        r10 = len(pos & set(ranked[:10])) / len(pos)
        for key in ("all", conditions.get(q) or "?"):
            per.setdefault(key, []).append((ap, p1, r10))
    return {k: {"map": float(np.mean([v[0] for v in vs])), "p1": float(np.mean([v[1] for v in vs])),
                "r10": float(np.mean([v[2] for v in vs])), "queries": len(vs)} for k, vs in per.items()}


def rank_by(rows: list[dict], key) -> list[str]:
    """Image ids by descending key(row) (ties: votes, then id)."""
    return [r["image_id"] for r in sorted(rows, key=lambda r: (-key(r), -r["votes"], r["image_id"]))]


def rule_current(min_inliers=25, share=0.15):
    def key(r):
        ok = r["inliers"] >= min_inliers and r["inliers"] >= share * r["n"]
        return (1e6 + r["inliers"]) if ok else r["votes"] / 1e3
    return key


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weights (bias last) of an L2-regularised logistic regression, Newton's method."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x1.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x1 @ w))
        g = x1.T @ (p - y) + l2 * np.r_[w[:-1], 0]
        h = (x1 * (p * (1 - p))[:, None]).T @ x1 + l2 * np.diag(np.r_[np.ones(len(w) - 1), 0])
        w -= np.linalg.solve(h, g)
    return w




def self_included_candidates(feats: dict, shortlist: int, neighbours: int, ratio: float) -> dict:
    """As ``candidates`` but searched the way a query by photo bytes is: the query's own
    photo stays in the index (its descriptors take the first neighbour of every row) and is
    dropped from the candidates afterwards (what ``bench_scale.py``'s accuracy does)."""
    from delf_tools.eval_local import ExactVoter
    from delf_tools.evaluation import queries_and_positives

    voter = ExactVoter({i: f[2] for i, f in feats.items()})
    queries = queries_and_positives({i: f[0] for i, f in feats.items()})
    return {q: [c for c in voter.search(feats[q][2].desc, shortlist + 1, neighbours, ratio) if c["image_id"] != q]
            for q in queries}


def load(cache: Path, conditions: dict[str, Path], photometric: str = "", stored: int = 0) -> dict:
    """{set: {image_id: (group, condition, LocalFeatures)}} of the sets found."""
    from delf_tools.eval_set import load_photos

    out = {}
    for s in SETS:
        root = DATA / s
        if not (root / "MANIFEST.tsv").exists():
            print(f"{root} not found: skipped", file=sys.stderr)
            continue
        feats = extract_set(root, cache, None, photometric, stored)
        cond = {p.image_id: p.condition for p in load_photos(root / "MANIFEST.tsv", conditions=conditions.get(s))}
        out[s] = {i: (g, cond.get(i, c), f) for i, (g, c, f) in feats.items()}
    return out


def score_key(inlier_weight: float, epipolar_weight: float = 0.0):
    """The ranking key ln(1 + votes) + w ln(1 + inliers) (+ e ln(1 + epipolar inliers))."""
    return lambda r: (np.log1p(r["votes"]) + inlier_weight * np.log1p(r["inliers"])
                      + epipolar_weight * np.log1p(r["epi"].get(8.0, 0)))


RULES = {
    "former: verified (25 inliers, 15%) first by inliers, then votes": rule_current(),
    "former without the 15% share": rule_current(25, 0.0),
    "votes only": lambda r: r["votes"],
    "inliers only": lambda r: r["inliers"],
    "epipolar inliers only (8 px)": lambda r: r["epi"].get(8.0, 0),
    "shipped score: ln(1+votes) + 0.1 ln(1+inliers)": score_key(0.1),
    "score + 0.2 ln(1+epipolar inliers)": score_key(0.1, 0.2),
}


def table(geo: dict, data: dict, rules: dict, conditions: bool) -> list[dict]:
    rows = []
    for name, key in rules.items():
        for s, per in geo.items():
            feats = data[s]
            parts = {s: per} if s != "pooled" else {
                f"{t[10:]}+distr": {q: rs for q, rs in per.items() if q.startswith(t + "/")} for t in SETS}
            for label, part in parts.items():
                m = metrics({q: rank_by(rs, key) for q, rs in part.items()}, {i: f[0] for i, f in feats.items()},
                            {i: f[1] for i, f in feats.items()}, pooled_sets=s == "pooled")
                for cond, f in sorted(m.items()):
                    if cond == "all" or conditions:
                        rows.append({"rule": name, "set": label, "condition": cond, **f})
    return rows


def fit(geo_dev: dict, groups: dict) -> dict:
    """The inlier weight (middle of the mAP plateau over a grid) and the logistic calibration,
    on landmarks-dev's shortlists only."""
    grid = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    maps = {w: metrics({q: rank_by(rs, score_key(w)) for q, rs in geo_dev.items()}, groups, {})["all"]["map"]
            for w in grid}
    best = max(maps.values())
    plateau = [w for w in grid if maps[w] >= best - 1e-9]
    weight = plateau[len(plateau) // 2]
    x = np.array([score_key(weight)(r) for rs in geo_dev.values() for r in rs])[:, None]
    y = np.array([float(groups[r["image_id"]] == groups[q]) for q, rs in geo_dev.items() for r in rs])
    slope, bias = fit_logistic(x, y, l2=0.0)
    return {"map_by_inlier_weight": maps, "inlier_weight": weight, "slope": float(slope), "bias": float(bias)}


def query_expansion(geo: dict, groups: dict, conditions: dict) -> list[dict]:
    """Rank-level query expansion: the first ``k`` results scoring at least ``bar`` lend their
    own rankings (score of j = max(own, min(score of r, w x r's score of j))); rows per setting."""
    from delf_common.ranking import match_score

    sc = {q: {r["image_id"]: match_score(r["votes"], r["inliers"]) for r in rs} for q, rs in geo.items()}
    base = {q: sorted(d, key=lambda i: (-d[i], i)) for q, d in sc.items()}
    rows = [{"rule": "no expansion", **metrics(base, groups, conditions)["all"]}]
    for bar, k, w in ((0.9, 1, 0.5), (0.9, 3, 0.5), (0.99, 3, 0.5), (0.9, 3, 1.0), (0.99, 1, 1.0)):
        out = {}
        for q, d in sc.items():
            new = dict(d)
            for r in (i for i in base[q][:k] if d[i] >= bar and i in sc):
                for j, v in sc[r].items():
                    if j != q:
                        new[j] = max(new.get(j, 0.0), min(d[r], w * v))
            out[q] = sorted(new, key=lambda i: (-new[i], i))
        rows.append({"rule": f"expansion: first {k} scoring >= {bar}, weight {w}",
                     **metrics(out, groups, conditions)["all"]})
    return rows


def verified_quality(geo: dict, groups: dict, score) -> dict:
    """Verified shortlisted photos and the share of them of the query's group, and the share
    of the true pairs verified."""
    v = tp = t = 0
    for q, rs in geo.items():
        for r in rs:
            ok, same = score(r), groups[r["image_id"]] == groups[q]
            v, tp, t = v + ok, tp + (ok and same), t + same
    return {"verified": v, "precision": tp / max(v, 1), "recall": tp / max(t, 1)}


def measure(args: argparse.Namespace, data: dict, nb: int, out: dict) -> None:
    """Every measurement asked for, at ``nb`` neighbours: printed and added to ``out``."""
    from delf_common.ranking import match_score

    geo = {}
    sets = dict(data, **({"pooled": pooled(data)} if args.pooled else {}))
    for s, feats in sets.items():
        t = time.monotonic()
        geo[s] = geometry(feats, candidates(feats, args.shortlist, nb, 0.9), 8.0, (8.0,))
        print(f"{s}: {nb} neighbours, shortlists verified in {time.monotonic() - t:.0f} s", file=sys.stderr)
    rows = table(geo, sets, RULES, args.conditions)
    if args.bytes_vs_id:
        for s, feats in data.items():
            g = geometry(feats, self_included_candidates(feats, args.shortlist, nb, 0.9), 8.0, ())
            rows += [dict(r, rule=r["rule"] + " [by bytes, itself indexed]")
                     for r in table({s: g}, data, {k: RULES[k] for k in list(RULES)[:1]}, False)]
    for r in rows:
        r["neighbours"] = nb
    out["rows"] += rows
    print(f"\n{nb} neighbours, exact kNN, shortlist {args.shortlist}")
    print(f"{'rule':<66} {'set':<15} {'condition':<22} {'mAP':>6} {'P@1':>6} {'R@10':>6} {'n':>4}")
    for r in rows:
        print(f"{r['rule'][:66]:<66} {r['set']:<15} {r['condition']:<22} {r['map']:>6.3f} {r['p1']:>6.3f} "
              f"{r['r10']:>6.3f} {r['queries']:>4}")
    for s in geo:
        groups = {i: f[0] for i, f in sets[s].items()}
        former = verified_quality(geo[s], groups, lambda r: r["inliers"] >= 25 and r["inliers"] >= 0.15 * r["n"])
        shipped = verified_quality(geo[s], groups, lambda r: match_score(r["votes"], r["inliers"]) >= 0.9)
        print(f"verified, {s}: former rule {former}; score >= 0.9 {shipped}")
        out.setdefault("verified", {})[f"{s}/{nb}"] = {"former": former, "score_0.9": shipped}
    if args.query_expansion:
        for s in data:
            for r in query_expansion(geo[s], {i: f[0] for i, f in data[s].items()}, {}):
                print(f"{s:<15} {r['rule']:<50} mAP {r['map']:.3f} P@1 {r['p1']:.3f}")
                out.setdefault("query_expansion", []).append({"set": s, "neighbours": nb, **r})
    if args.fit and "landmarks-dev" in geo:
        f = fit(geo["landmarks-dev"], {i: v[0] for i, v in data["landmarks-dev"].items()})
        print(f"fit on landmarks-dev ({nb} neighbours): {f}")
        out.setdefault("fit", {})[str(nb)] = f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-accuracy"), help="extracted features (npz per set)")
    p.add_argument("--neighbours", type=int, nargs="+", default=[10, 20], help="DELF_NEIGHBOURS values to compare")
    p.add_argument("--shortlist", type=int, default=100, help="as `delf eval` (top 100): max(DELF_SHORTLIST, 100)")
    p.add_argument("--conditions", action="store_true", help="also a row per condition")
    p.add_argument("--fit", action="store_true", help="choose the score's weights on landmarks-dev (see ranking.py)")
    p.add_argument("--bytes-vs-id", action="store_true",
                   help="also search each photo as `bench_scale` does (by bytes, itself still indexed)")
    p.add_argument("--pooled", action="store_true",
                   help="also both sets in one collection, each the other's real distractors")
    p.add_argument("--photometric", choices=sorted(PHOTOMETRIC), default="",
                   help="photometric handling of every photo before extraction (index and query side)")
    p.add_argument("--query-expansion", action="store_true", help="also rank-level query expansion")
    p.add_argument("--stored", type=int, default=0,
                   help="keep each photo's N best-scored descriptors (below DELF_STORED_FEATURES; 0: all cached)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    data = load(args.cache, {"landmarks-dev": REPO / "docs" / "eval" / "landmarks-dev-conditions.tsv"},
                args.photometric, args.stored)
    if not data:
        print("no evaluation set found under ../shared/data: nothing to measure", file=sys.stderr)
        return 0
    out: dict = {"rows": []}
    for nb in args.neighbours:
        measure(args, data, nb, out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
