#!/usr/bin/env python
"""Ingesting an unchanged folder again, through the running system.

Starts the launcher (as `delf up`: embedded Redis, one worker per service, Milvus Lite) in
a temporary folder, ingests landmarks-dev (../shared/data/landmarks-dev, or --photos) as
one bulk job, then the same folder again, unchanged, and prints: each job's seconds
(stream start to completion), photos indexed and unchanged, and the index's images and
descriptor rows after each. The second job should skip every photo before extraction
(same id, same bytes and metadata: docs/CONTRACTS.md, "Identical photos"). With
--duplicates it then runs `delf duplicates DIR` on that index and prints its groups (and
how long it took).

    .venv/bin/python scripts/bench_reingest.py [--photos DIR] [--duplicates] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_system import DEFAULT_PHOTOS, memory_gib, start_system


def one_job(client, folder: Path) -> dict:
    """Ingests the folder as one job and waits for it; its figures and the index's after it."""
    t = time.monotonic()
    job = client.wait_job(client.ingest_folder(folder).job_id)
    seconds = time.monotonic() - t
    stats = client.stats()
    return {"seconds": round(seconds, 2), "total": job.total, "done": job.done, "failed": job.failed,
            "unchanged": job.unchanged, "duplicates": job.duplicates,
            "images": stats.images, "descriptors": stats.descriptors}


def near_identical(address: str, folder: Path) -> dict:
    """`delf duplicates FOLDER --json` against the system, with its seconds."""
    import subprocess

    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "delf_tools.cli", "--gateway", address, "--timeout", "600",
                          "duplicates", str(folder), "--json"], capture_output=True, text=True, check=True).stdout
    return {**json.loads(out), "seconds": round(time.monotonic() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="a folder of photos (landmarks-dev)")
    p.add_argument("--duplicates", action="store_true", help="then `delf duplicates DIR --json` on that index")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not args.photos.is_dir():
        print(f"no folder {args.photos}: nothing to measure (skipped)")
        return 0

    from delf_common.client import DelfClient

    with tempfile.TemporaryDirectory(prefix="delf-reingest-") as tmp:
        proc, address = start_system(Path(tmp))
        try:
            client = DelfClient(address, timeout=600)
            first = one_job(client, args.photos)
            again = one_job(client, args.photos)
            groups = near_identical(address, args.photos) if args.duplicates else None
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory_gib()} GiB"
    result = {"machine": machine, "photos": str(args.photos), "first": first, "again": again,
              "speedup": round(first["seconds"] / max(again["seconds"], 1e-9), 1),
              "new_rows": again["descriptors"] - first["descriptors"], "duplicates": groups}
    print(f"ingesting {args.photos.name} twice ({machine})\n")
    print("| job | seconds | done | unchanged | failed | images after | descriptor rows after |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("first", first), ("again, unchanged", again)):
        print(f"| {name} | {r['seconds']:.2f} | {r['done']} | {r['unchanged']} | {r['failed']} | "
              f"{r['images']} | {r['descriptors']} |")
    print(f"\nagain / first: {result['speedup']}x faster; new rows: {result['new_rows']}")
    if groups is not None:
        print(f"\n`delf duplicates` over the {groups['searched']} photos: {len(groups['groups'])} groups "
              f"in {groups['seconds']} s")
        for g in groups["groups"]:
            print("  " + "  ".join(g["ids"]) + "  " + ", ".join(str(p["overlap"]) for p in g["pairs"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
