"""Reruns the self-healing measurements of BENCHMARKS.md ("Self-healing under delf up").

A `delf up` of its own (embedded Redis, Milvus Lite, default settings: visibility timeout
1 h, stall sweep 2 h) in a temp folder; for each worker kind (extractor, indexer, verifier)
a job of 10 small photos is started and the worker killed with kill -9 once 2 photos are
done; then 20 photos and kill -9 of the whole `delf up`, and a restart. For each fault:
how long until the service serves again (the launcher's "serving again" line; for the
whole machine, until the restart is ready), until the job completed (no command given),
and, for the verifier, a search sent right after the kill. Each job is checked for every
photo indexed exactly once (job counts, per-id GetImage, index totals).

    .venv/bin/python scripts/bench_faults.py [extra pytest options]

It runs tests/test_healing.py's live tests with -s, which print the table.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            "tests/test_healing.py", "-k", "kill_9 or print_the_table", *argv], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
