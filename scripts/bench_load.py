#!/usr/bin/env python
"""Load and ingest-throughput figures for the running system (issue 5).

Two measurements, each on a freshly started system (the launcher, as `make up`):

``ingest``: ingests the photos (landmarks-dev by default) as one bulk job with 1,
then 2 extractor workers, and prints photos/s for each.

``search``: for each deployment, ingests the photos, then runs N concurrent gRPC
search clients for D seconds (each its own channel, searching with photo bytes
in a loop, 30 s deadline per call), and prints requests/s, p50/p99 latency of
the calls that succeeded, the error count by status (RESOURCE_EXHAUSTED, the
deliberate backpressure refusal, is counted apart), and the gateway's resident
memory before and after the load.

Deployments:
  embedded  `delf up` defaults: embedded Redis, 1 extractor, 1 indexer, 1 verifier, Milvus Lite.
  multi     separate worker processes as in docker-compose: the machine's Redis
            (DELF_BENCH_REDIS_URL, default redis://127.0.0.1:6379/13), a real Milvus
            server (PyPI package `milvus`, fresh data folder), 2 extractors, 2 verifiers.

    .venv/bin/python scripts/bench_load.py ingest [--extractors 1 2]
    .venv/bin/python scripts/bench_load.py search [--deployment embedded multi] [--clients 8] [--duration 60]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench_system import free_port, memory_gib  # this script's folder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "landmarks-dev"


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory_gib()} GiB, no GPU"


@contextlib.contextmanager
def milvus_server(base: Path):
    from milvus import MilvusServer

    server = MilvusServer()
    server.set_base_dir(str(base))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


@contextlib.contextmanager
def running_system(tmp: Path, extractors: int = 1, verifiers: int = 1, env_extra: dict | None = None):
    """Starts the launcher; yields (address, launcher process)."""
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_")}
    env.update(env_extra or {})
    ready = tmp / "ready"
    argv = [sys.executable, "-m", "delf_tools.launcher", "--data-dir", str(tmp / "data"), "--grpc-addr", address,
            "--ready-file", str(ready), "--log-dir", str(tmp / "logs"),
            "--extractors", str(extractors), "--verifiers", str(verifiers)]
    if "DELF_REDIS_URL" not in env:
        argv += ["--redis-port", "0"]
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the system did not start; see {tmp / 'logs'}")
            time.sleep(0.5)
        yield address, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def gateway_rss_mib(launcher: subprocess.Popen) -> float:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "delf_gateway" in " ".join(child.cmdline()):
                return child.memory_info().rss / 2**20
    return float("nan")


def ingest(address: str, photos: Path) -> tuple[float, int, int]:
    from delf_common.client import DelfClient

    with DelfClient(address, timeout=1200) as client:
        t = time.monotonic()
        job = client.wait_job(client.ingest_folder(photos).job_id)
        return time.monotonic() - t, job.done, job.failed


def load(address: str, photos: list[bytes], clients: int, duration: float) -> dict:
    import grpc

    from delf_common.client import DelfClient

    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(n: int) -> None:
        with DelfClient(address, timeout=30) as client:
            i = n
            while time.monotonic() < stop_at:
                data = photos[i % len(photos)]
                i += clients
                t = time.monotonic()
                try:
                    client.search(data, top_k=10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    if code == "RESOURCE_EXHAUSTED":
                        time.sleep(0.2)   # what a polite client does on a refusal
                with lock:
                    codes[code] += 1
                    if code == "OK":
                        latencies.append(time.monotonic() - t)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")  # noqa: E731 - a one-line helper
    return {"ok": codes["OK"], "ok_per_s": codes["OK"] / wall, "p50": q(0.50), "p99": q(0.99),
            "refused": codes["RESOURCE_EXHAUSTED"],
            "errors": sum(v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")),
            "codes": dict(codes), "wall": wall}


def cmd_ingest(args) -> list[str]:
    rows = ["| extractor workers | photos | indexed / failed | seconds | photos/s |", "|---|---|---|---|---|"]
    n = sum(1 for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for extractors in args.extractors:
        with tempfile.TemporaryDirectory(prefix="delf-bench-load-") as tmp:
            with running_system(Path(tmp), extractors=extractors) as (address, _proc):
                seconds, done, failed = ingest(address, args.photos)
        rows.append(f"| {extractors} | {n} | {done} / {failed} | {seconds:.1f} | {n / seconds:.2f} |")
        print(rows[-1], flush=True)
    return [f"### Ingest throughput vs extractor workers ({time.strftime('%Y-%m-%d')}, {machine()})", "",
            f"`scripts/bench_load.py ingest --extractors {' '.join(map(str, args.extractors))}`, "
            f"embedded default otherwise, {args.photos.name}", ""] + rows


def cmd_search(args) -> list[str]:
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    data = [p.read_bytes() for p in photos]
    rows = ["| deployment | clients | seconds | searches OK | OK/s | p50 (s) | p99 (s) | RESOURCE_EXHAUSTED | "
            "other errors | gateway RSS before → after (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for deployment in args.deployment:
        with tempfile.TemporaryDirectory(prefix="delf-bench-load-") as tmp_s:
            tmp = Path(tmp_s)
            with contextlib.ExitStack() as stack:
                if deployment == "multi":
                    uri = stack.enter_context(milvus_server(tmp / "milvus"))
                    env = {"DELF_MILVUS_URI": uri, "DELF_MILVUS_TOKEN": "root:Milvus",
                           "DELF_REDIS_URL": os.environ.get("DELF_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
                           "DELF_QUEUE_PREFIX": f"delfbench-{uuid.uuid4().hex[:8]}"}
                    system = running_system(tmp, extractors=2, verifiers=2, env_extra=env)
                else:
                    system = running_system(tmp)
                address, proc = stack.enter_context(system)
                seconds, done, failed = ingest(address, args.photos)
                print(f"{deployment}: ingested {done} (failed {failed}) in {seconds:.1f} s", flush=True)
                before = gateway_rss_mib(proc)
                r = load(address, data, args.clients, args.duration)
                after = gateway_rss_mib(proc)
        rows.append(f"| {deployment} | {args.clients} | {r['wall']:.0f} | {r['ok']} | {r['ok_per_s']:.2f} | "
                    f"{r['p50']:.2f} | {r['p99']:.2f} | {r['refused']} | {r['errors']} | {before:.0f} → {after:.0f} |")
        print(rows[-1], r["codes"], flush=True)
    return [f"### Search under load ({time.strftime('%Y-%m-%d')}, {machine()})", "",
            f"`scripts/bench_load.py search --clients {args.clients} --duration {args.duration:g}`: searches with "
            f"photo bytes (extraction, voting, RANSAC), {len(data)} photos indexed, 30 s deadline per call", ""] + rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("ingest", "search"):
        s = sub.add_parser(name)
        s.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
        s.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    sub.choices["ingest"].add_argument("--extractors", type=int, nargs="+", default=[1, 2])
    sub.choices["search"].add_argument("--deployment", nargs="+", choices=["embedded", "multi"],
                                       default=["embedded", "multi"])
    sub.choices["search"].add_argument("--clients", type=int, default=8)
    sub.choices["search"].add_argument("--duration", type=float, default=60.0)
    args = p.parse_args()
    if not args.photos.is_dir():
        raise SystemExit(f"no photos folder {args.photos}")
    table = "\n".join(cmd_ingest(args) if args.cmd == "ingest" else cmd_search(args))
    print(table)
    if args.append:
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
