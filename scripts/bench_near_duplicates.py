#!/usr/bin/env python
"""What `delf duplicates` tells apart: resized copies against other photos of a place.

Starts the launcher (as `delf up`) in a temporary folder, ingests landmarks-dev
(../shared/data/landmarks-dev, or --photos) and, under new ids (`ID-copy`), every --every'th
photo resized to 70% and re-encoded (JPEG quality 80); then searches by every id, as
`delf duplicates` does, and keeps each verified match's homography overlap and inlier share
(`delf_tools.duplicates`). Prints, for copy pairs and for every other pair: how many, the
lowest / highest overlap and inlier share, how many pass `delf duplicates`' defaults;
--json writes every pair.

    .venv/bin/python scripts/bench_near_duplicates.py [--photos DIR] [--every 23] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_system import DEFAULT_PHOTOS, start_system


def resized_copy(path: Path) -> bytes:
    import cv2

    small = cv2.resize(cv2.imread(str(path)), None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()


def verified_pairs(client, ids: list[str]) -> list[dict]:
    """Every verified match of a search by each id: its overlap and inlier share."""
    from delf_tools.duplicates import image_sizes, mutual_overlap

    size = image_sizes(client)

    rows = []
    for image_id in ids:
        found = client.search(image_id=image_id, top_k=10)
        for m in found.matches:
            if m.verified and len(m.corners) == 4:
                overlap = mutual_overlap([(p.x, p.y) for p in m.corners], size(image_id), size(m.image_id))
                rows.append({"query": image_id, "match": m.image_id, "overlap": round(overlap, 3),
                             "inlier_share": round(m.inliers / max(1, found.query_features), 3)})
    return rows


def summary(rows: list[dict]) -> list[str]:
    from delf_tools.duplicates import DEFAULT_INLIERS, DEFAULT_OVERLAP

    def is_copy(r: dict) -> bool:
        return r["query"] + "-copy" == r["match"] or r["match"] + "-copy" == r["query"]

    out = ["| pairs | n | overlap min / max | inlier share min / max | grouped at the defaults |",
           "|---|---|---|---|---|"]
    for name, kind in (("resized copy and original", True), ("other photos (same place)", False)):
        part = [r for r in rows if is_copy(r) == kind]
        if not part:
            continue
        ov = [r["overlap"] for r in part]
        sh = [r["inlier_share"] for r in part]
        grouped = sum(r["overlap"] >= DEFAULT_OVERLAP and r["inlier_share"] >= DEFAULT_INLIERS for r in part)
        out.append(f"| {name} | {len(part)} | {min(ov):.3f} / {max(ov):.3f} | {min(sh):.3f} / {max(sh):.3f} | "
                   f"{grouped} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="a folder of photos (landmarks-dev)")
    p.add_argument("--every", type=int, default=23, help="a resized copy of every N-th photo")
    p.add_argument("--json", type=Path, help="also write every pair to this JSON file")
    args = p.parse_args(argv)
    if not args.photos.is_dir():
        print(f"no folder {args.photos}: nothing to measure (skipped)")
        return 0

    from delf_common.client import DelfClient, photos_in
    from delf_common.proto.delf.v1 import delf_pb2

    photos = photos_in(args.photos)
    copies = {i + "-copy": resized_copy(path) for i, path in photos[::args.every]}
    items = [delf_pb2.IngestItem(image_id=i, image=path.read_bytes()) for i, path in photos]
    items += [delf_pb2.IngestItem(image_id=i, image=data) for i, data in copies.items()]
    with tempfile.TemporaryDirectory(prefix="delf-near-") as tmp:
        proc, address = start_system(Path(tmp))
        try:
            client = DelfClient(address, timeout=600)
            client.wait_job(client.start_ingest_job(iter(items)).job_id)
            rows = verified_pairs(client, [i for i, _ in photos] + list(copies))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    print(f"verified matches of {len(photos)} photos and {len(copies)} resized copies\n")
    print("\n".join(summary(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
