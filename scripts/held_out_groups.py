#!/usr/bin/env python
"""landmarks-dev's held-out groups as a manifest `delf eval` reads: every photo indexed, only
the groups the trained attention head never saw (``delf_tools.train_data.split_groups``) are
queries; a photo of a training group becomes a single distractor (group ``distractor_<name>``).

The manifest goes into OUT with a link per top-level folder of the set, so `delf eval` finds
the photos (and gives them the same ids as landmarks-dev's own manifest: evaluated on the same
running index right after landmarks-dev, nothing is extracted again). Nothing is copied.

    .venv/bin/python scripts/held_out_groups.py /tmp/held-out
    .venv/bin/delf eval /tmp/held-out/MANIFEST.tsv --gateway 127.0.0.1:PORT --methods delf
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "landmarks-dev"


def write(out: Path, source: Path = DEV) -> int:
    """Write OUT/MANIFEST.tsv and the folder links; the number of photos made distractors."""
    from delf_tools.train_data import is_training_group

    with open(source / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out.mkdir(parents=True, exist_ok=True)
    made = 0
    for row in rows:
        top = row["path"].split("/")[0]
        link = out / top
        if not link.exists():
            link.symlink_to((source / top).resolve())
        if is_training_group(row["group"]):
            row["group"] = "distractor_" + Path(row["path"]).stem.replace(" ", "_")
            made += 1
    with open(out / "MANIFEST.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for MANIFEST.tsv and the links (made if missing)")
    p.add_argument("--source", type=Path, default=DEV, help="the landmarks-dev folder")
    args = p.parse_args(argv)
    if not (args.source / "MANIFEST.tsv").is_file():
        print(f"{args.source} has no MANIFEST.tsv: nothing to write", file=sys.stderr)
        return 1
    made = write(args.out, args.source)
    print(f"{args.out / 'MANIFEST.tsv'}: {made} photos of the attention head's training groups made single distractors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
