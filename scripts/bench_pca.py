#!/usr/bin/env python
"""How many PCA dimensions? Accuracy on landmarks-dev and the kNN cost at 1M descriptors.

The default extractor's raw 112-d descriptors of every landmarks-dev photo (cached in
--cache) are reduced by each shipped PCA artifact (``effnet-lite0-pca40``, the default, and
``effnet-lite0-pca64``; both fitted by ``delf fit-pca`` on scikit-image's sample photos) and,
for reference, left unreduced (L2 only). For each: mAP of the indexer's voting (exact kNN,
the 500 best-scored query descriptors, 11 neighbours, ratio 0.9, 50-photo shortlist) and of
the shipped ranking after the verifier's RANSAC, over all 114 queries. Then the cost side:
500 queries against 1M clustered synthetic unit vectors of each dimension in a faiss
IVF_FLAT index shaped like a Milvus Lite segment's (nlist 128, nprobe 8), median of 5.

    .venv/bin/python scripts/bench_pca.py [--model effnet-lite0-cat32] [--photos DIR] [--cache PATH] [--skip-knn]

--model: another preset (its raw descriptors and its shipped ``<model>-pca*.npz``).
"""
from __future__ import annotations

import argparse
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np

from delf_tools.eval_local import ExactVoter, LocalFeatures, rerank
from delf_tools.evaluation import average_precision, read_manifest
from delf_common.images import ImageLimits, decode_image
from delf_extractor import models
from delf_extractor import pca as pca_mod

REPO = Path(__file__).resolve().parents[1]
QUERY_FEATURES, SHORTLIST, NEIGHBOURS, RATIO = 500, 50, 10, 0.9


def raw_features(root: Path, rows, cache: Path, model: str = "effnet-lite0") -> list[dict]:
    if not cache.exists():
        from delf_extractor.extract import DelfExtractor

        ex = DelfExtractor(model, pca=None)
        out = []
        for path, _ in rows:
            f = ex.extract(decode_image((root / path).read_bytes(), ImageLimits.from_env()))
            out.append({"xy": f.locations, "desc": f.descriptors, "score": f.scores,
                        "scale": f.scales, "size": tuple(f.image_size)})
        cache.write_bytes(pickle.dumps(out))
    return pickle.loads(cache.read_bytes())


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def accuracy(feats: list[dict], descs: list[np.ndarray], groups: list[str]) -> tuple[float, float]:
    ids = [str(i) for i in range(len(feats))]
    voter = ExactVoter({i: LocalFeatures(feats[int(i)]["xy"], descs[int(i)], feats[int(i)]["size"],
                                         feats[int(i)]["scale"]) for i in ids})
    sizes = Counter(groups)
    votes_ap, verified_ap = [], []
    for q in (q for q in range(len(feats)) if sizes[groups[q]] >= 2):
        f = feats[q]
        keep = np.sort(np.argsort(-f["score"], kind="stable")[:QUERY_FEATURES])
        query = LocalFeatures(f["xy"][keep], descs[q][keep], f["size"], f["scale"][keep])
        cands = voter.search(query.desc, SHORTLIST, NEIGHBOURS, RATIO, exclude=str(q))
        positives = {str(i) for i in range(len(feats)) if groups[i] == groups[q] and i != q}
        votes_ap.append(average_precision([c["image_id"] for c in cands], positives))
        ranked = rerank(query, cands, 8.0, 0.9)
        verified_ap.append(average_precision([m["image_id"] for m in ranked], positives))
    return float(np.mean(votes_ap)), float(np.mean(verified_ap))


def knn_seconds(dim: int, n: int = 1_000_000, queries: int = 500) -> float:
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    x = l2n(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, 128)
    index.train(x[:100_000])
    index.add(x)
    index.nprobe = 8
    q = l2n(x[rng.integers(0, n, queries)] + 0.05 * rng.standard_normal((queries, dim)).astype(np.float32))
    index.search(q, NEIGHBOURS + 1)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        index.search(q, NEIGHBOURS + 1)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "landmarks-dev")
    p.add_argument("--model", default="effnet-lite0")
    p.add_argument("--cache", type=Path, default=None, help="default: /tmp/delf-bench-pca-<model>.pkl")
    p.add_argument("--skip-knn", action="store_true", help="accuracy only")
    args = p.parse_args()
    rows = read_manifest(args.photos / "MANIFEST.tsv")
    groups = [g for _, g in rows]
    cache = args.cache or Path(f"/tmp/delf-bench-pca-{args.model}.pkl")
    feats = raw_features(args.photos, rows, cache, args.model)
    channels = models.get_config(args.model).channels
    variants = {}
    for path in sorted(models.WEIGHTS_DIR.glob(f"{args.model}-pca*.npz")):
        pca = pca_mod.load_pca(path)
        variants[f"{path.stem} ({pca.record['explained_variance_ratio']:.0%} variance)"] = (
            pca.dim, [l2n((f["desc"] - pca.mean) @ pca.components.T) for f in feats])
    variants[f"no PCA ({channels}-d, L2 only)"] = (channels, [l2n(f["desc"]) for f in feats])
    print(f"{len(rows)} photos, {args.model}, exact kNN voting, {QUERY_FEATURES} query descriptors")
    print("| descriptors | dims | mAP (votes) | mAP (verified, shipped ranking) | "
          "kNN of 500 queries at 1M, IVF nlist 128 nprobe 8 (s) |")
    print("|---|---|---|---|---|")
    for name, (dim, descs) in variants.items():
        votes, verified = accuracy(feats, descs, groups)
        knn = "-" if args.skip_knn else f"{knn_seconds(dim):.3f}"
        print(f"| {name} | {dim} | {votes:.3f} | {verified:.3f} | {knn} |", flush=True)


if __name__ == "__main__":
    main()
