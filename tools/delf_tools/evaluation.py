"""Retrieval evaluation on a ground-truth manifest (Oxford/Paris-style protocol).

A manifest is a tab-separated file with a header row; `path` (relative to the
manifest's folder) and `group` columns are used, others ignored. Every photo is
in the database; every photo whose group has another is a query, left out of its
own ranking; its positives are the other photos of its group.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path


def read_manifest(path: str | Path) -> list[tuple[str, str]]:
    """(relative photo path, group) for each row of a MANIFEST.tsv."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    try:
        ip, ig = header.index("path"), header.index("group")
    except ValueError:
        raise ValueError(f"{path}: the header needs 'path' and 'group' columns, got {header}") from None
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return [(r[ip], r[ig]) for r in rows]


def queries_and_positives(groups: dict[str, str]) -> dict[str, set[str]]:
    """For each query id (its group has another member): the other ids of its group."""
    sizes = Counter(groups.values())
    return {
        q: {i for i, g in groups.items() if g == groups[q] and i != q}
        for q in sorted(groups) if sizes[groups[q]] >= 2
    }


def average_precision(ranked: list, positives: set) -> float:
    """AP over a ranking; positives never ranked count as misses."""
    hits, total = 0, 0.0
    for rank, item in enumerate(ranked, 1):
        if item in positives:
            hits += 1
            total += hits / rank
    return total / len(positives) if positives else 0.0
