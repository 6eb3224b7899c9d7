#!/usr/bin/env python
"""Scale counted in photos: memory, disk, fill rate, latency and accuracy per collection size.

For each size (photos), a fresh index is filled with the landmarks-dev photos (their
descriptors extracted once by the shipped default extractor and cached) plus synthetic
distractor photos, each with as many descriptors as the store keeps per photo
(DELF_STORED_FEATURES), drawn from a model of the real descriptors as
``bench_latency.py`` draws them. The fill goes through the indexer's own bulk path
(``DescriptorStore.add_many``). Then the system is started on that index as ``make up``
starts it (the launcher: gateway, Celery workers on an embedded Redis) and measured
through gRPC:

* ``search_bytes_median_s`` / ``search_bytes_p95_s``: Search with a photo's bytes
  (extraction, kNN + votes, RANSAC, every hop), ``--queries`` landmarks-dev photos;
* ``search_id_median_s``: Search by an indexed id;
* ``map`` / ``precision_at_1``: every landmarks-dev photo with another photo of its group
  searched by its indexed id (the photo left out of its own search, as `delf eval` does;
  by bytes until 2026-12-05), mAP over the top 100;
* ``map_without_distractors``: the same queries on an index of the landmarks-dev photos
  alone (measured once per backend, on a run of its own); with ``--real-distractors`` the
  index holds real distractor photos before the synthetic ones (every landmarks-hard photo
  and scikit-image's samples; landmarks-hard's Gendarmenmarkt photos, the place of a
  landmarks-dev group, are junk for that group's queries: left out of their rankings, not
  positives, as in Oxford's protocol), so ``--sizes 219`` measures among real distractors
  alone, each query with the positives it has without them;
* ``ram_bytes_per_photo``: resident memory of every process that holds the index (the
  indexer worker; with ``--backend server`` also the Milvus server), after the searches,
  divided by the photos;
* ``disk_bytes_per_photo``: the index's files divided by the photos;
* ``fill_rows_per_s``: descriptor rows per second through ``add_many``; ``extra``
  ``searchable_rows_per_s``: the same rows over the fill and the wait until every row is
  searchable through the index (Lite's flush and segment index builds, a server's index
  build).

``--backend lite`` (the default) is the embedded default: a Milvus Lite file in the
system's data folder. ``--backend server`` starts a Milvus server from the PyPI
``milvus`` package (fresh data folder per size) and points the system at it; its index
type comes from DELF_MILVUS_INDEX (``--server-index``).

    .venv/bin/python scripts/bench_scale.py --sizes 1000,10000,30000 --json scale.json
    .venv/bin/python scripts/bench_scale.py --sizes 30000 --backend server --server-index IVF_SQ8
    DELF_MILVUS_INDEX_PARAMS='{"m": 12}' .venv/bin/python scripts/bench_scale.py --sizes 30000 \
        --backend server --server-index IVF_PQ --server-mmap
    .venv/bin/python scripts/bench_scale.py --plot scale.json [more.json ...] --out scale.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_latency  # noqa: E402 - real_features, Distractors, pct
from real_distractors import SAME_PLACE, real_distractors  # noqa: E402 - after the sys.path / environment setup above
from bench_system import start_system  # noqa: E402 - after the sys.path / environment setup above

DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "landmarks-dev"
BATCH_PHOTOS = 200  # photos per add_many call


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs
class Inputs:
    """The real photos' descriptors, the distractor model and the query photos."""

    def __init__(self, args):
        from delf_extractor.extract import DelfExtractor

        extractor = DelfExtractor()
        bench_latency.PCA_ID = self.pca_id = extractor.pca_id  # the system's extractor can search these
        del extractor
        self.photos = args.photos
        self.real = bench_latency.real_features(args.photos, args.cache)
        self.distractors = bench_latency.Distractors(
            np.concatenate([f.descriptors for _, _, f in self.real.values()]))
        groups = {i: g for i, (g, _, _) in self.real.items()}
        self.map_queries = [i for i in sorted(groups)
                            if any(groups[j] == groups[i] for j in groups if j != i)]
        self.timed = self.map_queries[:: max(1, len(self.map_queries) // args.queries)][: args.queries]
        # Real distractor photos: never queries; one of them that shows a query's place
        # (SAME_PLACE) is junk for that query, neither a positive nor an error, so each query
        # has the positives it has without distractors (``accuracy``).
        self.real_distractors = real_distractors(args.cache) if getattr(args, "real_distractors", False) else {}
        for i, (g, _, _) in self.real_distractors.items():
            groups[i] = SAME_PLACE.get(g, g)
        self.groups = groups

    def photo_bytes(self, image_id: str) -> bytes:
        return (self.photos / self.real[image_id][1]).read_bytes()


# ----------------------------------------------------------------------------- backends
class LiteBackend:
    """The embedded default: a Milvus Lite file in the system's data folder."""

    name = "lite"

    def __init__(self, work: Path):
        self.work = work
        self.env: dict[str, str] = {}

    def uri(self) -> str:
        return str(self.work / "data" / "milvus.db")

    def index_pids(self) -> list[int]:
        return []  # the index lives in the indexer worker's process

    def disk_bytes(self) -> int:
        return _du(Path(self.uri()))

    def stop(self) -> None:
        pass


class ServerBackend:
    """A Milvus server from the PyPI `milvus` package, fresh data folder."""

    name = "server"

    def __init__(self, work: Path, mmap: bool = False):
        from milvus import MilvusServer

        self.base = work / "milvus"
        self.server = MilvusServer()
        self.server.set_base_dir(str(self.base))
        # Milvus 2.3 maps sealed segments' raw fields from this folder instead of loading
        # them into RAM (2.4+: queryNode.mmap.*). The PyPI package's config template lacks
        # the key; Milvus reads QUERYNODE_MMAPDIRPATH from the environment as that key.
        os.environ.pop("QUERYNODE_MMAPDIRPATH", None)
        if mmap:
            os.environ["QUERYNODE_MMAPDIRPATH"] = str(self.base / "mmap")
        self.server.start()
        # The build reloads the collection, but a query node on two shared cores may still
        # take minutes over the first search of millions of rows: a longer task deadline.
        self.env = {"DELF_MILVUS_URI": self.uri(), "DELF_MILVUS_TOKEN": "root:Milvus",
                    "DELF_TASK_TIMEOUT_S": "900"}

    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.listen_port}"

    def index_pids(self) -> list[int]:
        import psutil

        proc = psutil.Process(self.server.server_proc.pid)
        return [proc.pid] + [p.pid for p in proc.children(recursive=True)]

    def disk_bytes(self) -> int:
        """The server's stored data and its mmap files (not its binaries and logs)."""
        return sum(_du(self.base / part) for part in ("data", "mmap") if (self.base / part).exists())

    def stop(self) -> None:
        self.server.stop()


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- fill
def fill(store, inputs: Inputs, photos: int, stored: int) -> dict:
    """The real photos, the real distractor photos (``--real-distractors``), then synthetic
    distractor photos up to `photos`, through `add_many`."""
    batch = [(i, f, {"group": g, "kind": "real"}) for i, (g, _, f) in inputs.real.items()]
    batch += [(i, f, {"group": g, "kind": "real-distractor"}) for i, (g, _, f) in inputs.real_distractors.items()]
    batch = batch[:photos]
    rows, t0, k = 0, time.monotonic(), 0
    for start in range(0, len(batch), BATCH_PHOTOS):
        rows += sum(r["num_features"] for r in store.add_many(batch[start:start + BATCH_PHOTOS]))
    remaining = photos - len(batch)
    while remaining > 0:
        n = min(BATCH_PHOTOS, remaining)
        items = [(f"synthetic-{k + j:07d}", inputs.distractors.photo(stored), {"kind": "synthetic"})
                 for j in range(n)]
        rows += sum(r["num_features"] for r in store.add_many(items))
        k, remaining = k + n, remaining - n
        if (k // BATCH_PHOTOS) % 25 == 0:
            log(f"  {len(batch) + k} photos, {rows} rows, {rows / (time.monotonic() - t0):.0f} rows/s")
    seconds = time.monotonic() - t0
    return {"rows": rows, "fill_s": seconds, "fill_rows_per_s": rows / seconds}


def build_index(backend, inputs: Inputs, photos: int, stored: int) -> dict:
    """Fill the index in a child process: a Lite file's segments stay in the memory of the
    process that wrote them, which must be gone before the system loads the file."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_build_index, (backend.uri(), inputs, photos, stored))


def _build_index(uri: str, inputs: Inputs, photos: int, stored: int) -> dict:
    from delf_indexer.store import DescriptorStore

    bench_latency.PCA_ID = inputs.pca_id  # distractor photos carry it (a fresh process here)
    store = DescriptorStore(uri, collection="delf")
    try:
        info = fill(store, inputs, photos, stored)
        t = time.monotonic()
        store.settle()
        info["descriptors"] = store.stats()["descriptors"]
        if store.backend.kind != "lite":
            _wait_for_server_index(store, info["descriptors"])
        info["settle_s"] = time.monotonic() - t
    finally:
        store.close()
    return info


def _wait_for_server_index(store, rows: int) -> None:
    """A Milvus server builds its index after the flush, in the background: until then a
    search scans raw segments. Wait until every row is indexed (Milvus 2.3.5 leaves
    pending_index_rows stale after the build: count indexed_rows), then load it afresh."""
    store.client.flush(store.features_name)
    while True:
        done = int(store.client.describe_index(store.features_name, "desc").get("indexed_rows", 0))
        if done >= rows:
            break
        log(f"  index build: {done} of {rows} rows indexed")
        time.sleep(15)
    # Load every segment with its index now (as a restarted server would), not during
    # the first timed search.
    t = time.monotonic()
    for name in (store.features_name, store.images_name):
        store.client.release_collection(name)
        store.client.load_collection(name, timeout=3600)
    log(f"  collection loaded in {time.monotonic() - t:.0f} s")


# ----------------------------------------------------------------------------- system
def indexer_pids(launcher_pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(launcher_pid).children(recursive=True)
            if "delf_indexer.tasks" in " ".join(p.cmdline())]


def rss_bytes(pids: list[int]) -> int:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def file_backed_bytes(pids: list[int]) -> int:
    """The part of rss_bytes that is mapped files (e.g. mmapped segments): pages the OS
    may drop and read back."""
    import psutil

    return sum(psutil.Process(pid).memory_info().shared for pid in pids)


def timed_searches(client, inputs: Inputs) -> dict:
    by_bytes, by_id = [], []
    for qid in inputs.timed:
        data = inputs.photo_bytes(qid)
        t = time.monotonic()
        client.search(data, top_k=10)
        by_bytes.append(time.monotonic() - t)
        t = time.monotonic()
        client.search(image_id=qid, top_k=10)
        by_id.append(time.monotonic() - t)
    return {"search_bytes_median_s": statistics.median(by_bytes),
            "search_bytes_p95_s": bench_latency.pct(by_bytes, 0.95),
            "search_id_median_s": statistics.median(by_id), "queries": len(by_bytes)}


def accuracy(client, inputs: Inputs) -> dict:
    """Every landmarks-dev photo with a positive, searched by its indexed id: the search
    leaves the photo out of its own neighbours, as a new photo's search by bytes (the same
    descriptors) finds none of its own. Searching an indexed photo's bytes instead lets its
    own descriptors take the first neighbour of every row and moves the ratio test's bar
    (BENCHMARKS.md, "Right on the hard photos": 0.941 that way against 0.929 by id)."""
    from delf_tools.evaluation import average_precision

    aps, p1 = [], []
    for qid in inputs.map_queries:
        response = client.search(image_id=qid, top_k=100)
        positives = {j for j in inputs.real if j != qid and inputs.groups[j] == inputs.groups[qid]}
        junk = {j for j in inputs.real_distractors if inputs.groups[j] == inputs.groups[qid]}
        ranked = [m.image_id for m in response.matches if m.image_id != qid and m.image_id not in junk]
        aps.append(average_precision(ranked, positives))
        p1.append(float(bool(ranked) and ranked[0] in positives))
    return {"map": float(np.mean(aps)), "precision_at_1": float(np.mean(p1)), "map_queries": len(aps)}


def measure_system(work: Path, backend, inputs: Inputs, photos: int, env: dict) -> dict:
    from delf_common.client import DelfClient

    proc, address = start_system(work, {**env, **backend.env})
    try:
        client = DelfClient(address, timeout=600)
        client.search(image_id=inputs.timed[0], top_k=10)  # warm-up: the indexer opens the index
        out = timed_searches(client, inputs)
        out.update(accuracy(client, inputs))
        pids = indexer_pids(proc.pid) + backend.index_pids()
        held = rss_bytes(pids)
        out["ram_file_backed_bytes"] = file_backed_bytes(pids)
        out["ram_bytes_per_photo"] = held / photos
        out["ram_bytes"] = held
        client.close()
    finally:
        _stop(proc)
    return out


def _stop(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------------------- one size
def run_size(args, inputs: Inputs, photos: int) -> dict:
    from delf_common import config

    stored = int(config.get("DELF_STORED_FEATURES")) or 1000
    with tempfile.TemporaryDirectory(prefix="delf-bench-scale-", dir=args.work) as tmp:
        work = Path(tmp)
        backend = ServerBackend(work, args.server_mmap) if args.backend == "server" else LiteBackend(work)
        try:
            log(f"{backend.name} {photos} photos: filling ({stored} descriptors per photo)")
            info = build_index(backend, inputs, photos, stored)
            log(f"{backend.name} {photos} photos: {info}")
            disk = backend.disk_bytes()
            result = measure_system(work, backend, inputs, photos, _system_env(args))
        finally:
            backend.stop()
    return {"photos": photos, "descriptors": info["descriptors"], "backend": backend.name,
            "index": _index_name(args), "stored_per_photo": stored,
            "ram_bytes_per_photo": result.pop("ram_bytes_per_photo"),
            "disk_bytes_per_photo": disk / photos, "fill_rows_per_s": info["fill_rows_per_s"],
            **{k: result[k] for k in ("search_bytes_median_s", "search_bytes_p95_s", "search_id_median_s",
                                      "map", "precision_at_1")},
            "extra": {"settle_s": info["settle_s"],
                      "searchable_rows_per_s": info["rows"] / (info["fill_s"] + info["settle_s"]),
                      "ram_bytes": result["ram_bytes"],
                      "ram_file_backed_bytes": result["ram_file_backed_bytes"],
                      "queries": result["queries"], "map_queries": result["map_queries"],
                      "cpu_cores": os.cpu_count()}}


def _system_env(args) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("DELF_")}
    env.update(dict(kv.split("=", 1) for kv in args.system_env.split(",") if kv))
    return env


def _index_name(args) -> str:
    from delf_indexer.backends import BACKENDS

    if args.backend == "lite":
        return BACKENDS["lite"].index_settings().index_type
    index = BACKENDS["server"].index_settings()
    parts = [index.index_type]
    if index.index_type == "IVF_PQ":
        parts.append(f"m={index.build_params_for(96)['m']}")
    if args.server_mmap:
        parts.append("mmap")
    return " ".join(parts)


# ----------------------------------------------------------------------------- output
COLUMNS = [("photos", "{:,}"), ("descriptors", "{:,}"), ("backend", "{}"), ("index", "{}"),
           ("ram_bytes_per_photo", "{:,.0f}"), ("disk_bytes_per_photo", "{:,.0f}"),
           ("fill_rows_per_s", "{:,.0f}"), ("search_bytes_median_s", "{:.2f}"),
           ("search_bytes_p95_s", "{:.2f}"), ("search_id_median_s", "{:.2f}"), ("map", "{:.3f}"),
           ("precision_at_1", "{:.3f}"), ("map_without_distractors", "{:.3f}")]


def print_table(results: list[dict]) -> None:
    print(f"\n{os.cpu_count()} CPU cores, no GPU; through the running system")
    print("| " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in results:
        print("| " + " | ".join(fmt.format(r[c]) if r.get(c) is not None else "" for c, fmt in COLUMNS) + " |",
              flush=True)


def plot(paths: list[Path], out: Path) -> None:
    """Log-log: RAM per photo, and search latency (median, p95), against photos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ram, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}  # one line per setting, whichever files its sizes are in
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            label = f"{r['backend']} {r.get('index', '')}".strip()
            if r.get("stored_per_photo"):
                label += f", {r['stored_per_photo']} stored"
            series.setdefault(label, []).append(r)
    for label, runs in series.items():
        runs.sort(key=lambda r: r["photos"])
        x = [r["photos"] for r in runs]
        ax_ram.plot(x, [r["ram_bytes_per_photo"] / 1024 for r in runs], "o-", label=label)
        ax_lat.plot(x, [r["search_bytes_median_s"] for r in runs], "o-", label=f"{label}, median")
        ax_lat.plot(x, [r["search_bytes_p95_s"] for r in runs], "s--", label=f"{label}, p95")
    for ax, title, unit in ((ax_ram, "memory that holds the index", "KB per photo"),
                            (ax_lat, "search by photo bytes", "seconds")):
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_title(title), ax.set_xlabel("photos in the index"), ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,30000", help="photos per index, comma-separated")
    p.add_argument("--backend", choices=("lite", "server"), default="lite")
    p.add_argument("--server-index", default="", help="DELF_MILVUS_INDEX for --backend server")
    p.add_argument("--server-mmap", action="store_true",
                   help="--backend server: map sealed segments' raw fields from disk (queryNode.mmapDirPath)")
    p.add_argument("--json", type=Path, help="write the results (a list, one object per size)")
    p.add_argument("--queries", type=int, default=20, help="photos searched for the latency figures")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-bench-latency"))
    p.add_argument("--work", type=Path, default=None, help="folder for the indexes, created when missing (default: the temp dir)")
    p.add_argument("--system-env", default="", help="extra settings for the system, KEY=VALUE,KEY=VALUE")
    p.add_argument("--no-baseline", action="store_true", help="skip map_without_distractors")
    p.add_argument("--real-distractors", action="store_true",
                   help="after the landmarks-dev photos, fill with real distractor photos (every "
                        "landmarks-hard photo and 8 of scikit-image's samples: 219 photos in all), then "
                        "synthetic ones up to each size")
    p.add_argument("--plot", nargs="+", type=Path, help="instead: plot these JSON files")
    p.add_argument("--out", type=Path, default=Path("scale.png"), help="with --plot: the PNG to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(args.plot, args.out)
        print(f"wrote {args.out}")
        return 0
    if not (args.photos / "MANIFEST.tsv").is_file():
        raise SystemExit(f"no MANIFEST.tsv in {args.photos}: landmarks-dev is needed")
    if args.server_index:
        os.environ["DELF_MILVUS_INDEX"] = args.server_index
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.work is not None:  # up-front: each size's temporary folder is made in it after minutes of work
        args.work.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(args)
    baseline = None
    if not args.no_baseline:
        baseline = run_size(args, inputs, len(inputs.real))["map"]
        log(f"map without distractors: {baseline:.3f}")
    results = []
    for photos in (int(s) for s in args.sizes.split(",")):
        results.append({**run_size(args, inputs, photos), "map_without_distractors": baseline})
        print_table(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
