"""Ingest throughput of the extractor's batching path: photos/s for several DELF_WORKER_BATCH values.

Runs what an extractor worker runs for delf.ingest.extract, in this process: 2 x batch
threads each read a photo file, decode it and hand it to a `delf_extractor.batcher.Batcher`,
which runs `DelfExtractor.extract_batch` on up to `batch` photos at a time (photos of
equal size share each forward pass). No Celery or Redis: this measures the extraction
side only. Prints a markdown table.

    nice -n 10 .venv/bin/python scripts/bench_batching.py [--photos 20] [--batches 1,4] [--device cpu] [--one-size]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_DATA = Path("/work/shared/data/landmarks-dev")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DELF_LANDMARKS_DEV", DEFAULT_DATA)))
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--wait-ms", type=float, default=100.0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per batch size (best is kept)")
    parser.add_argument("--one-size", action="store_true",
                        help="take the photos of the most common size only (every batch shares its forward passes)")
    args = parser.parse_args()

    manifest = args.data / "MANIFEST.tsv"
    if not manifest.is_file():
        print(f"no {manifest}: nothing to measure", file=sys.stderr)
        return 1
    rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:] if line.strip()]
    if args.one_size:
        from collections import Counter

        common = Counter((r[2], r[3]) for r in rows).most_common(1)[0][0]
        rows = [r for r in rows if (r[2], r[3]) == common]
    paths = [args.data / r[0] for r in rows][: args.photos]

    from delf_common.images import ImageLimits, decode_image
    from delf_extractor.extract import DelfExtractor
    from delf_extractor.batcher import Batcher

    ex = DelfExtractor(device=args.device)
    sizes = {decode_image(p.read_bytes(), ImageLimits.from_env()).shape[:2] for p in paths}
    ex.extract(decode_image(paths[0].read_bytes(), ImageLimits.from_env()))  # warm-up

    print(f"{len(paths)} photos from {args.data.name} ({len(sizes)} distinct sizes), model {ex.model_name}, "
          f"device {ex.device}, torch threads {__import__('torch').get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print()
    print("| DELF_WORKER_BATCH | threads | wall (s) | photos/s | forward batches (size: count) |")
    print("|---|---|---|---|---|")
    for b in [int(x) for x in args.batches.split(",")]:
        best, best_sizes = None, None
        for _ in range(args.repeat):
            batcher = Batcher(ex.extract_batch, b, args.wait_ms / 1000.0)

            def one(path: Path, batcher=batcher):
                with batcher.slot() as slot:
                    rgb = decode_image(path.read_bytes(), ImageLimits.from_env())
                    return len(batcher.submit(rgb, slot=slot))

            t = time.perf_counter()
            with ThreadPoolExecutor(2 * b) as pool:
                counts = list(pool.map(one, paths))
            wall = time.perf_counter() - t
            assert all(c > 0 for c in counts)
            if best is None or wall < best:
                best, best_sizes = wall, dict(sorted(batcher.sizes.items()))
        hist = ", ".join(f"{k}: {v}" for k, v in best_sizes.items())
        print(f"| {b} | {2 * b} | {best:.1f} | {len(paths) / best:.2f} | {hist} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
