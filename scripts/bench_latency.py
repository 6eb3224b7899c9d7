#!/usr/bin/env python
"""How search latency grows with the index: median / p95 per stage at 10k, 100k, 1M descriptors.

For each size a fresh Milvus Lite file (the embedded default; ``--server`` adds a Milvus
server from the PyPI ``milvus`` package, fresh data dir each time) is filled with the
real landmarks-dev descriptors (as many photos as fit) plus synthetic distractor photos
of 1000 descriptors each, through ``DescriptorStore.add`` (the indexer's insert path; its
rate is reported). Distractor descriptors are drawn from a model of the real ones
(k-means with 256 cells over the real descriptors, a diagonal Gaussian per cell,
L2-normalised), at uniform random positions: they crowd the same regions of descriptor
space as real ones without being copies of any indexed photo (augmented copies of the
115 photos would be near-duplicates of the queries' positives under other ids).

Stages, in this process, for ``--queries`` landmarks-dev photos searched with their
bytes (the photo is also in the index, as with a user's photo of an indexed place):

* extraction: decode + DELF extraction of the query (the extractor worker's work;
  independent of the index, measured once per query);
* kNN + votes: ``DescriptorStore.search`` (the indexer's task body: Milvus search,
  ratio-test votes, shortlist's metadata);
* verification: the verifier's ``verify_candidates`` over the whole shortlist, serially
  (the system splits it over verifier workers);
* total: the sum (the running system adds Celery/Redis hops, ~10-30 ms).

Accuracy: every indexed landmarks-dev photo with an indexed positive is a query (its own
stored descriptors, itself excluded, as ``Search(image_id)``); mAP over the top 100 of the
verified ranking. Lite files are cached under ``--cache`` (reused when their row count
matches); delete the folder to rebuild.

    .venv/bin/python scripts/bench_latency.py [--sizes 10000,100000,1000000] [--queries 20]
        [--map-queries 0] [--variants direct,api:32,direct:6/0] [--server] [--cache /tmp/delf-bench-latency]
    .venv/bin/python scripts/bench_latency.py --system [--sizes ...]   # end to end, same indexes
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "landmarks-dev"
PCA_ID = "bench"
PER_PHOTO = 1000
COLLECTION = "delf"  # the default DELF_COLLECTION, so --system's launcher opens the cached file as is
SHORTLIST = 50


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def real_features(photos: Path, cache: Path):
    """Per-photo DelfFeatures of landmarks-dev (default extractor), cached as npz."""
    from delf_tools.evaluation import read_manifest
    from delf_common.features import DelfFeatures

    rows = read_manifest(photos / "MANIFEST.tsv")
    path = cache / "real.npz"
    cache.mkdir(parents=True, exist_ok=True)
    ranking_cache = Path("/tmp/delf-bench-ranking.npz")  # scripts/bench_ranking.py's, same extractor
    default_extractor = not (os.environ.get("DELF_MODEL") or os.environ.get("DELF_PCA"))
    if not path.exists() and ranking_cache.exists() and default_extractor and photos.name == "landmarks-dev":
        z = np.load(ranking_cache)
        n = np.bincount(z["I"], minlength=len(rows))
        # it lacks scales and scores: features come sorted by score, so rank stands in for it
        scores = np.concatenate([np.linspace(1.0, 0.0, c, dtype=np.float32) for c in n])
        np.savez(path, L=z["L"], D=z["D"], I=z["I"], S=z["S"], C=np.ones(len(z["I"]), np.float32), O=scores)
    if not path.exists():
        from delf_common.images import ImageLimits, decode_image
        from delf_extractor.extract import DelfExtractor

        ex = DelfExtractor()
        parts = {k: [] for k in "LDISCO"}
        for k, (rel, _) in enumerate(rows):
            f = ex.extract(decode_image((photos / rel).read_bytes(), ImageLimits.from_env()))
            parts["L"].append(f.locations), parts["D"].append(f.descriptors)
            parts["I"].append(np.full(len(f), k)), parts["S"].append(np.array([f.image_size]))
            parts["C"].append(f.scales), parts["O"].append(f.scores)
        np.savez(path, **{k: np.concatenate(v) for k, v in parts.items()})
    z = np.load(path)
    out = {}
    for k, (rel, group) in enumerate(rows):
        m = z["I"] == k
        image_id = rel.rsplit(".", 1)[0]
        out[image_id] = (group, rel, DelfFeatures(
            z["L"][m], z["C"][m], z["O"][m], z["D"][m], tuple(int(v) for v in z["S"][k]),
            model="bench", pca_id=PCA_ID))
    return out


class Distractors:
    """Synthetic photos whose descriptors follow the real descriptors' distribution."""

    def __init__(self, real: np.ndarray, cells: int = 256, seed: int = 0):
        import faiss

        km = faiss.Kmeans(real.shape[1], cells, niter=20, seed=seed, verbose=False)
        km.train(np.ascontiguousarray(real, np.float32))
        _, assign = km.index.search(np.ascontiguousarray(real, np.float32), 1)
        assign = assign.ravel()
        self.means = km.centroids.copy()
        self.stds = np.stack([real[assign == c].std(0) if np.any(assign == c) else np.full(real.shape[1], 0.05)
                              for c in range(cells)]).astype(np.float32)
        self.weights = np.bincount(assign, minlength=cells) / len(assign)
        self.rng = np.random.default_rng(seed)

    def photo(self, n: int = PER_PHOTO):
        from delf_common.features import DelfFeatures

        c = self.rng.choice(len(self.means), size=n, p=self.weights)
        d = self.means[c] + self.stds[c] * self.rng.standard_normal((n, self.means.shape[1])).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        xy = self.rng.uniform([0, 0], [1024, 768], (n, 2)).astype(np.float32)
        return DelfFeatures(xy, self.rng.uniform(0.25, 1.414, n).astype(np.float32),
                            np.sort(self.rng.random(n).astype(np.float32))[::-1].copy(), d.astype(np.float32),
                            (1024, 768), model="bench", pca_id=PCA_ID)


def add_real(store, size: int, real: dict) -> tuple[list[str], int]:
    """Index the real photos (through `DescriptorStore.add`) while they fit in `size` rows."""
    added, rows = [], 0
    for image_id, (group, _, f) in real.items():
        if rows + len(f) > size:
            break
        store.add(image_id, f, {"group": group, "kind": "real"})
        rows += len(f)
        added.append(image_id)
    return added, rows


def fill(store, size: int, real: dict, distractors: Distractors, log) -> dict:
    """Index real photos while they fit, then distractors up to `size` descriptors."""
    t0 = time.monotonic()
    added, rows = add_real(store, size, real)
    k = 0
    while rows < size:
        f = distractors.photo(min(PER_PHOTO, size - rows))
        store.add(f"synthetic-{k:07d}", f, {"kind": "synthetic"})
        rows += len(f)
        k += 1
        if k % 100 == 0:
            log(f"  {rows} rows, {rows / (time.monotonic() - t0):.0f} rows/s")
    insert_s = time.monotonic() - t0
    t = time.monotonic()
    store.settle()
    return {"real_photos": len(added), "rows": rows, "insert_rows_per_s": rows / insert_s,
            "settle_s": time.monotonic() - t}


def bulk_fill(store, size: int, real: dict, distractors: Distractors, log, photos_per_call: int = 100) -> dict:
    """Server only (--bulk): the rows `DescriptorStore.add` writes, but many photos per insert
    call and no per-photo read-back (`add` checks the PCA and an older copy of the id, a
    strongly consistent query each: 1-2k rows/s, hours for 10M). Real photos go through
    `add`; the distractor ids are new, so nothing needs replacing."""
    t0 = time.monotonic()
    added, rows = add_real(store, size, real)
    k = 0
    while rows < size:
        feats, images = [], []
        for _ in range(photos_per_call):
            if rows >= size:
                break
            f = distractors.photo(min(PER_PHOTO, size - rows))
            image_id, generation = f"synthetic-{k:07d}", time.time_ns()
            feats.extend(store.feature_rows(image_id, f, generation))
            images.append({"image_id": image_id, "metadata": '{"kind": "synthetic"}',
                           "meta": {"kind": "synthetic"}, "width": 1024, "height": 768,
                           "num_features": len(f), "pca_id": f.pca_id, "model": f.model,
                           "generation": generation, "dummy": [0.0, 0.0]})
            rows += len(f)
            k += 1
        store.client.insert(store.features_name, feats)
        store.client.insert(store.images_name, images)
        if k % 1000 < photos_per_call:
            log(f"  {rows} rows, {rows / (time.monotonic() - t0):.0f} rows/s")
    insert_s = time.monotonic() - t0
    t = time.monotonic()
    store.client.flush(store.features_name)
    store.client.flush(store.images_name)
    while True:  # until the server has indexed every row (search would scan the rest)
        info = store.client.describe_index(store.features_name, "desc")
        # (Milvus 2.3.5 leaves pending_index_rows stale once the build has finished.)
        if int(info.get("indexed_rows", 0)) >= rows:
            break
        log(f"  index build: {info.get('indexed_rows')} of {rows} rows indexed")
        time.sleep(15)
    return {"real_photos": len(added), "rows": rows, "insert_rows_per_s": rows / insert_s,
            "settle_s": time.monotonic() - t}


def open_store(kind: str, size: int, cache: Path, server_uri: str | None):
    from delf_indexer.store import DescriptorStore

    if kind == "lite":
        return DescriptorStore(str(cache / f"lite-{size}.db"), collection=COLLECTION)
    return DescriptorStore(server_uri, token="root:Milvus", collection=f"bench{size}")


def search_stages(store, query, exclude=(), shortlist=SHORTLIST):
    from delf_common.features import encode_array
    from delf_common.ranking import rank_matches
    from delf_verifier.tasks import verify_candidates

    t = time.monotonic()
    cands = store.search(query, shortlist=shortlist, exclude=list(exclude))
    t_knn = time.monotonic() - t
    t = time.monotonic()
    q = {"locations": encode_array(query.locations), "image_size": list(query.image_size), "box": None}
    matches = verify_candidates(q, cands, {})["matches"] if cands else []
    t_verify = time.monotonic() - t
    return t_knn, t_verify, [m["image_id"] for m in rank_matches(matches)]


def run_size(kind, size, args, real, distractors, queries, extract_s, log, server_uri=None):
    """Fill (or reuse) one index; measure every variant on it."""

    path = args.cache / f"lite-{size}.db"
    info = None
    if kind == "lite" and path.exists():
        store = open_store(kind, size, args.cache, server_uri)
        if store.stats()["descriptors"] != size:
            store.close()
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        else:
            info = {"real_photos": sum(1 for i in real if store._image_rows([i])), "rows": size,
                    "insert_rows_per_s": float("nan"), "settle_s": float("nan")}
            log(f"{kind} {size}: reusing {path}")
    if info is None:
        store = open_store(kind, size, args.cache, server_uri)
        log(f"{kind} {size}: filling")
        filler = bulk_fill if kind == "server" and args.bulk else fill
        info = filler(store, size, real, distractors, log)
        log(f"{kind} {size}: {info}")
    out = []
    from delf_indexer.backends import lite_fast

    shipped_rows_per_probe = lite_fast.ROWS_PER_PROBE
    try:
        indexed = {i for i in real if store._image_rows([i])}
        for variant in args.variants.split(","):
            path, _, nprobe = variant.partition(":")
            nprobe, _, per_probe = nprobe.partition("/")  # direct:6/0: 6 lists in every segment (before 2026-12-05)
            lite_fast.ROWS_PER_PROBE = int(per_probe) if per_probe else shipped_rows_per_probe
            if kind == "server" and path == "direct":
                path = "api"  # a server has one search path
            os.environ["DELF_LITE_DIRECT_SEARCH"] = "1" if path == "direct" else "0"
            if nprobe and path == "direct":
                store.index = dataclasses.replace(store.index, direct_nprobe=int(nprobe))
            elif nprobe and "nprobe" in store.index.search_params:
                store.index = dataclasses.replace(store.index, search_params={"nprobe": int(nprobe)})
            params = ({"nprobe": store.index.direct_nprobe, "rows per probe": lite_fast.ROWS_PER_PROBE}
                      if path == "direct" else store.index.search_params)
            log(f"{kind} {size}: {path} {params}")
            out.append({**info, "kind": kind, "size": size, "path": path,
                        "params": ", ".join(f"{k} {v}" for k, v in params.items()),
                        **measure(store, indexed, real, queries, extract_s, args.map_queries)})
    finally:
        lite_fast.ROWS_PER_PROBE = shipped_rows_per_probe
        store.close()
    return out


def measure(store, indexed, real, queries, extract_s, map_queries) -> dict:
    from delf_tools.evaluation import average_precision

    store.search(queries[0][1])  # warm-up (loads segments and indexes)
    knn, ver, tot = [], [], []
    for (_qid, f), ex_s in zip(queries, extract_s):
        a, b, _ = search_stages(store, f)
        knn.append(a), ver.append(b), tot.append(ex_s + a + b)
    groups = {i: real[i][0] for i in indexed}
    qids = [i for i in sorted(indexed) if any(groups[j] == groups[i] for j in indexed if j != i)]
    if map_queries:
        qids = qids[:: max(1, len(qids) // map_queries)][: map_queries]
    aps = []
    for qid in qids:
        _, _, ranked = search_stages(store, real[qid][2], exclude=[qid])
        positives = {j for j in indexed if j != qid and groups[j] == groups[qid]}
        aps.append(average_precision(ranked[:100], positives))
    return {
        "extract": (statistics.median(extract_s), pct(extract_s, 0.95)),
        "knn": (statistics.median(knn), pct(knn, 0.95)),
        "verify": (statistics.median(ver), pct(ver, 0.95)),
        "total": (statistics.median(tot), pct(tot, 0.95)),
        "map": float(np.mean(aps)) if aps else float("nan"), "map_queries": len(aps),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=20, help="photos searched with their bytes (latency)")
    p.add_argument("--map-queries", type=int, default=0, help="queries for mAP (0: all)")
    p.add_argument("--server", action="store_true", help="also a Milvus server (PyPI `milvus`), fresh per size")
    p.add_argument("--server-only", action="store_true", help="only the Milvus server")
    p.add_argument("--server-index", default="",
                   help="DELF_MILVUS_INDEX for the server's collection (default: the shipped HNSW)")
    p.add_argument("--bulk", action="store_true",
                   help="server: fill with many photos per insert call (see bulk_fill), for 10M")
    p.add_argument("--query-max-scale", type=float, default=0.0,
                   help="with --system: DELF_QUERY_MAX_SCALE for the extractor (0: every level)")
    p.add_argument("--system-env", default="",
                   help="with --system: settings for the system, KEY=VALUE,KEY=VALUE (e.g. DELF_LITE_NPROBE=4)")
    p.add_argument("--system", action="store_true",
                   help="instead: time Search end to end through the running system on each cached "
                        "Lite index (run without --system first)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-bench-latency"))
    p.add_argument("--json", type=Path, help="write the rows (one object per index and search path)")
    p.add_argument("--variants", default="direct",
                   help="search paths to measure on each index, comma-separated, each `direct` (the "
                        "indexer's read of Lite's faiss segments, the default) or `api` (Lite's search "
                        "API), optionally `:NPROBE`; `direct:NPROBE/ROWS`: the direct path scanning at "
                        "least NPROBE x ROWS rows per query in the whole collection (`/0`: NPROBE lists of every segment, "
                        "the rule before 2026-12-05)")
    return p.parse_args()


def extractor_and_features(args: argparse.Namespace):
    """(the shipped extractor, the real photos' features); sets PCA_ID to the extractor's."""
    from delf_extractor.extract import DelfExtractor

    global PCA_ID
    ex = DelfExtractor()
    PCA_ID = ex.pca_id  # the running system's extractor can then search these indexes
    return ex, real_features(args.photos, args.cache)


def extract_queries(ex, args: argparse.Namespace, real: dict):
    """(--queries photos' features, the seconds each extraction took)."""
    from delf_common.images import ImageLimits, decode_image

    ids = sorted(real)
    queries, extract_s = [], []
    for qid in ids[:: max(1, len(ids) // args.queries)][: args.queries]:
        data = (args.photos / real[qid][1]).read_bytes()
        t = time.monotonic()
        f = ex.extract(decode_image(data, ImageLimits.from_env()))
        extract_s.append(time.monotonic() - t)
        queries.append((qid, type(f)(f.locations, f.scales, f.scores, f.descriptors, f.image_size,
                                     model="bench", pca_id=PCA_ID)))
    return queries, extract_s


def run_server_sizes(args, sizes, real, distractors, queries, extract_s, log, results) -> None:
    """Each size on a fresh Milvus server (PyPI `milvus`), its folder removed after."""
    from milvus import MilvusServer

    for size in sizes:
        server = MilvusServer()
        base = args.cache / f"server-{size}"
        shutil.rmtree(base, ignore_errors=True)
        server.set_base_dir(str(base))
        server.start()
        try:
            results.extend(run_size("server", size, args, real, distractors, queries, extract_s, log,
                                    server_uri=f"http://127.0.0.1:{server.listen_port}"))
        finally:
            server.stop()
            shutil.rmtree(base, ignore_errors=True)
        print_table(results)


def main() -> int:
    args = parse_args()
    if not (args.photos / "MANIFEST.tsv").is_file():
        raise SystemExit(f"no MANIFEST.tsv in {args.photos}")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.server_index:
        os.environ["DELF_MILVUS_INDEX"] = args.server_index
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 - a one-line helper

    ex, real = extractor_and_features(args)
    distractors = Distractors(np.concatenate([f.descriptors for _, _, f in real.values()]))
    queries, extract_s = extract_queries(ex, args, real)
    del ex

    results = []
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.system:
        return run_system(args, sizes, real, log)
    for size in sizes if not args.server_only else ():
        results.extend(run_size("lite", size, args, real, distractors, queries, extract_s, log))
        print_table(results)
    if args.server or args.server_only:
        run_server_sizes(args, sizes, real, distractors, queries, extract_s, log, results)
    if args.json:
        import json

        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


def run_system(args, sizes, real, log) -> int:
    """End to end through the running system (`make up`'s launcher: gateway, Celery workers
    on an embedded Redis, the indexer on a copy of the cached Lite file): Search with photo
    bytes (extraction, kNN + votes, RANSAC, every hop) and by indexed id."""
    sys.path.insert(0, str(REPO / "scripts"))
    import tempfile

    from bench_system import start_system
    from delf_common.client import DelfClient

    rows = []
    for size in sizes:
        fits, total = [], 0  # the real photos `fill` put in this index (manifest order)
        for image_id, (_, _, f) in real.items():
            if total + len(f) > size:
                break
            total += len(f)
            fits.append(image_id)
        fits.sort()
        picked = fits[:: max(1, len(fits) // args.queries)][: args.queries]
        src = args.cache / f"lite-{size}.db"
        if not src.exists():
            raise SystemExit(f"no {src}: run without --system first to fill it")
        with tempfile.TemporaryDirectory(prefix="delf-bench-lat-") as tmp:
            shutil.copytree(src, Path(tmp) / "data" / "milvus.db")
            env = dict(kv.split("=", 1) for kv in args.system_env.split(",") if kv)
            if args.query_max_scale:
                env["DELF_QUERY_MAX_SCALE"] = str(args.query_max_scale)
            proc, address = start_system(Path(tmp), env)
            try:
                client = DelfClient(address, timeout=600)
                client.search(image_id=picked[0], top_k=10)  # warm-up: the indexer opens Lite
                by_bytes, by_id = [], []
                for qid in picked:
                    data = (args.photos / real[qid][1]).read_bytes()
                    t = time.monotonic()
                    client.search(data, top_k=10)
                    by_bytes.append(time.monotonic() - t)
                    t = time.monotonic()
                    client.search(image_id=qid, top_k=10)
                    by_id.append(time.monotonic() - t)
            finally:
                import signal

                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
        rows.append((size, by_bytes, by_id))
        log(f"system {size}: {statistics.median(by_bytes):.3f} s by bytes")
    print(f"\n{os.cpu_count()} CPU cores, no GPU; Search through the running system, seconds")
    print("| descriptors | by photo bytes, median / p95 | by indexed id, median / p95 | queries |")
    print("|---|---|---|---|")
    for size, a, b in rows:
        print(f"| {size:,} | {statistics.median(a):.3f} / {pct(a, 0.95):.3f} | "
              f"{statistics.median(b):.3f} / {pct(b, 0.95):.3f} | {len(a)} |")
    return 0


def print_table(results) -> None:
    print(f"\n{os.cpu_count()} CPU cores, no GPU; stage medians / p95 in seconds")
    print("| index | search path | descriptors | real photos | insert rows/s | settle s | extraction | "
          "kNN + votes | verification | total | mAP (queries) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def f(s, r=r):
            return f"{r[s][0]:.3f} / {r[s][1]:.3f}"
        print(f"| {r['kind']} | {r['path']}, {r['params']} | {r['size']:,} | {r['real_photos']} | "
              f"{r['insert_rows_per_s']:.0f} | "
              f"{r['settle_s']:.1f} | {f('extract')} | {f('knn')} | {f('verify')} | {f('total')} | "
              f"{r['map']:.3f} ({r['map_queries']}) |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
