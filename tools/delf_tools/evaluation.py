"""Retrieval evaluation on a ground-truth manifest (Oxford/Paris-style protocol).

A manifest is a tab-separated file with a header row; `path` (relative to the
manifest's folder) and `group` columns are used, others ignored. Every photo is
in the database; every photo whose group has another is a query, left out of its
own ranking; its positives are the other photos of its group.

Conditions (day-night, illumination, outdoor-viewpoint, ...) for per-condition figures come
from a `condition` column, else from a `note` column starting with `cond=NAME` (as
landmarks-hard writes them), else from a conditions file (`read_conditions_file`: `group`
and `condition` columns; the project keeps one for landmarks-dev in `docs/eval/`).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from delf_common.manifest import read_table


def read_manifest(path: str | Path) -> list[tuple[str, str]]:
    """(relative photo path, group) for each row of a MANIFEST.tsv (read as `delf ingest`
    reads one: delf_common.manifest.read_table)."""
    rows = read_table(path)
    header = list(rows[0]) if rows else []
    if rows and not {"path", "group"} <= set(header):
        raise ValueError(f"{path}: the header needs 'path' and 'group' columns, got {header}")
    return [(r["path"], r["group"]) for r in rows]


def read_conditions(path: str | Path) -> dict[str, str]:
    """{relative photo path: condition} of the rows of a MANIFEST.tsv that name one."""
    out = {}
    for r in read_table(path):
        if r.get("condition", "").strip():
            out[r["path"]] = r["condition"].strip()
        elif r.get("note", "").startswith("cond="):
            out[r["path"]] = re.split(r"[\s;(]", r["note"][5:], maxsplit=1)[0]
    return out


def read_conditions_file(path: str | Path) -> dict[str, str]:
    """{group: condition} of a tab-separated file with `group` and `condition` columns."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    header = lines[0].split("\t")
    try:
        ig, ic = header.index("group"), header.index("condition")
    except ValueError:
        raise ValueError(f"{path}: the header needs 'group' and 'condition' columns, got {header}") from None
    return {r[ig]: r[ic] for r in (line.split("\t") for line in lines[1:]) if len(r) > max(ig, ic)}


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
