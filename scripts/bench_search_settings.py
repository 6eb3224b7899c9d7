#!/usr/bin/env python
"""Search settings compared on one kept index, through the running system.

``bench_scale.py`` fills a fresh index per run; comparing search settings that way costs
a fill per setting and mixes fill-to-fill noise into the comparison. This fills one
index with ``bench_scale``'s own fill (the landmarks-dev photos plus synthetic distractor
photos) into ``--index-dir`` once, keeps it, and runs ``bench_scale``'s measurement (the
system as ``make up`` starts it: search latency by bytes and by id, mAP, P@1, memory) once
per setting on that same index. A later call with the same ``--index-dir`` reuses it.

    .venv/bin/python scripts/bench_search_settings.py --photos-in-index 30000 \\
        --index-dir /tmp/delf-idx-30k --settings "" "DELF_LITE_NPROBE=6,DELF_NEIGHBOURS=20"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos-in-index", type=int, default=30000, help="photos in the kept index")
    p.add_argument("--index-dir", type=Path, required=True, help="folder of the kept index")
    p.add_argument("--settings", nargs="+", default=[""],
                   help='one per run: KEY=VALUE,KEY=VALUE ("" = the shipped defaults)')
    p.add_argument("--queries", type=int, default=20, help="photos searched for the latency figures")
    p.add_argument("--photos", type=Path, default=bench_scale.DEFAULT_PHOTOS)
    p.add_argument("--cache", type=Path, default=Path("/tmp/delf-bench-latency"))
    p.add_argument("--json", type=Path, help="write the results (a list, one object per setting)")
    args = p.parse_args(argv)
    if not (args.photos / "MANIFEST.tsv").exists():
        print(f"no photos at {args.photos}: nothing to measure", file=sys.stderr)
        return 0
    from delf_common import config

    inputs = bench_scale.Inputs(args)
    backend = bench_scale.LiteBackend(args.index_dir)
    if not Path(backend.uri()).exists():
        (args.index_dir / "data").mkdir(parents=True, exist_ok=True)
        stored = int(config.get("DELF_STORED_FEATURES")) or 1000
        info = bench_scale.build_index(backend, inputs, args.photos_in_index, stored)
        bench_scale.log(f"filled {args.index_dir}: {info}")
    results = []
    for setting in args.settings:
        env = dict(kv.split("=", 1) for kv in setting.split(",") if kv)
        (args.index_dir / "ready").unlink(missing_ok=True)  # start_system waits for a new one
        result = bench_scale.measure_system(args.index_dir, backend, inputs, args.photos_in_index, env)
        results.append({"settings": env, "photos": args.photos_in_index, **result})
        bench_scale.log(json.dumps(results[-1]))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print("| settings | by bytes median / p95 (s) | by id (s) | mAP | P@1 |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {','.join(f'{k}={v}' for k, v in r['settings'].items()) or 'defaults'} | "
              f"{r['search_bytes_median_s']:.2f} / {r['search_bytes_p95_s']:.2f} | "
              f"{r['search_id_median_s']:.2f} | {r['map']:.3f} | {r['precision_at_1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
