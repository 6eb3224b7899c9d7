#!/usr/bin/env python
"""End-to-end figures of the running system, as `make up` starts it.

Starts the launcher (embedded Redis, one worker per service, Milvus Lite) in a
temporary folder, ingests landmarks-dev (../shared/data/landmarks-dev, or
--photos) as one bulk job through the gateway, then measures:
  - ingest rate (photos/s, the whole job, upload to indexed);
  - search latency (median and p95 of --queries searches with photo bytes, the
    full path: extraction, voting, RANSAC);
  - retrieval quality: every photo whose group has another is a query (by its
    indexed id, which leaves itself out); top-1 accuracy, mAP over the top 100.
Prints a table; --append adds it to BENCHMARKS.md with the machine's description.

    .venv/bin/python scripts/bench_system.py [--photos DIR] [--queries 20] [--append]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "landmarks-dev"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_gib() -> int:
    with open("/proc/meminfo") as f:
        return round(int(f.readline().split()[1]) / 2**20)


def start_system(tmp: Path, env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
    env.update(env_extra or {})
    ready = tmp / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "delf_tools.launcher", "--data-dir", str(tmp / "data"), "--grpc-addr", address,
         "--redis-port", "0", "--ready-file", str(ready), "--log-dir", str(tmp / "logs")],
        env=env, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the system did not start; see {tmp / 'logs'}")
        time.sleep(0.5)
    return proc, address


def search_by_bytes(client, ids: list[str], paths: dict, n: int) -> list[float]:
    """Seconds per Search with a photo's bytes, for `n` photos spread over the collection."""
    latencies = []
    for image_id in ids[:: max(1, len(ids) // n)][: n]:
        data = paths[image_id].read_bytes()
        t = time.monotonic()
        client.search(data, top_k=10)
        latencies.append(time.monotonic() - t)
    return latencies


def search_by_id(client, queries: dict) -> tuple[list[bool], list[float], list[float]]:
    """Per query (an indexed id): whether the top match is a positive, the AP of the top 100,
    and the seconds the Search took."""
    from delf_tools.evaluation import average_precision

    top1, aps, by_id = [], [], []
    for image_id, positives in queries.items():
        t = time.monotonic()
        ranked = [m.image_id for m in client.search(image_id=image_id, top_k=100).matches]
        by_id.append(time.monotonic() - t)
        top1.append(bool(ranked) and ranked[0] in positives)
        aps.append(average_precision(ranked, positives))
    return top1, aps, by_id


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder with MANIFEST.tsv (path, group)")
    p.add_argument("--queries", type=int, default=20, help="searches with photo bytes for the latency figure")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args()
    if not (args.photos / "MANIFEST.tsv").is_file():
        raise SystemExit(f"no MANIFEST.tsv in {args.photos}")

    from delf_common.client import DelfClient
    from delf_tools.evaluation import queries_and_positives, read_manifest

    groups = {path.rsplit(".", 1)[0]: group for path, group in read_manifest(args.photos / "MANIFEST.tsv")}
    queries = queries_and_positives(groups)
    with tempfile.TemporaryDirectory(prefix="delf-bench-") as tmp:
        proc, address = start_system(Path(tmp))
        try:
            client = DelfClient(address, timeout=600)
            t = time.monotonic()
            job = client.wait_job(client.ingest_folder(args.photos).job_id)
            ingest_s = time.monotonic() - t
            ids = sorted(groups)
            paths = {i: next(args.photos.glob(i + ".*")) for i in ids}
            latencies = search_by_bytes(client, ids, paths, args.queries)
            top1, aps, by_id = search_by_id(client, queries)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)

    latencies.sort()
    rows = {
        "photos indexed / failed": f"{job.done} / {job.failed}",
        "ingest rate (photos/s, 1 extractor)": f"{len(ids) / ingest_s:.2f}",
        f"search latency, photo bytes, median of {len(latencies)} (s)": f"{statistics.median(latencies):.2f}",
        "search latency, photo bytes, p95 (s)": f"{latencies[int(0.95 * (len(latencies) - 1))]:.2f}",
        "search latency, by indexed id, median (s)": f"{statistics.median(by_id):.2f}",
        f"top-1 accuracy ({len(queries)} queries)": f"{sum(top1) / len(top1):.3f}",
        "mAP (top 100)": f"{sum(aps) / len(aps):.3f}",
    }
    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory_gib()} GiB, no GPU"
    table = [f"### System end to end ({time.strftime('%Y-%m-%d')}, {machine})", "",
             f"`scripts/bench_system.py --photos {args.photos.name}`, embedded default (`make up` settings)", "",
             "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()]
    text = "\n".join(table)
    print(text)
    print(json.dumps(rows))
    if args.append:
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
