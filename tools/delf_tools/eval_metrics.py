"""The figures of `delf eval`: precision@k, recall@k, interpolated precision-recall, one
method's summary and the table printed for all of them."""
from __future__ import annotations

import statistics

import numpy as np

from delf_tools.eval_set import MethodRun
from delf_tools.evaluation import average_precision

RECALL_LEVELS = np.linspace(0.0, 1.0, 21)


def precision_at(ranked: list, positives: set, k: int = 1) -> float:
    """Fraction of the first k results that are positives (missing ranks count as misses)."""
    return sum(1 for item in ranked[:k] if item in positives) / k


def recall_at(ranked: list, positives: set, k: int = 10) -> float:
    """Fraction of the positives found in the first k results."""
    return len(set(ranked[:k]) & positives) / len(positives) if positives else 0.0


def interpolated_pr(ranked: list, positives: set, levels: np.ndarray = RECALL_LEVELS) -> np.ndarray:
    """Interpolated precision at each recall level: the best precision at any rank whose
    recall reaches that level (0 where the ranking never reaches it)."""
    out = np.zeros(len(levels))
    if not positives:
        return out
    hits, points = 0, []
    for rank, item in enumerate(ranked, 1):
        if item in positives:
            hits += 1
            points.append((hits / len(positives), hits / rank))
    for i, level in enumerate(levels):
        reached = [p for r, p in points if r >= level - 1e-9]
        out[i] = max(reached) if reached else 0.0
    return out


def summarise(run: MethodRun, queries: dict[str, set[str]], n_photos: int,
              conditions: dict[str, str] | None = None) -> dict:
    """The JSON figures of one method (plus its mean PR curve under ``pr_curve``);
    with ``conditions`` ({query: condition}) naming any, also ``by_condition``, {condition:
    {map, precision_at_1, recall_at_10, queries}}."""
    aps, p1, r10, curves = [], [], [], []
    per: dict[str, list[tuple[float, float, float]]] = {}
    for q, positives in queries.items():
        ranked = run.rankings.get(q, [])
        aps.append(average_precision(ranked, positives))
        p1.append(precision_at(ranked, positives, 1))
        r10.append(recall_at(ranked, positives, 10))
        curves.append(interpolated_pr(ranked, positives))
        if conditions:
            per.setdefault(conditions.get(q) or "(none)", []).append((aps[-1], p1[-1], r10[-1]))
    lat = sorted(run.latencies)
    by_condition = {c: {"map": float(np.mean([v[0] for v in vs])), "precision_at_1": float(np.mean([v[1] for v in vs])),
                        "recall_at_10": float(np.mean([v[2] for v in vs])), "queries": len(vs)}
                    for c, vs in sorted(per.items())}
    return {
        **({"by_condition": by_condition} if by_condition else {}),
        "map": float(np.mean(aps)) if aps else 0.0,
        "precision_at_1": float(np.mean(p1)) if p1 else 0.0,
        "recall_at_10": float(np.mean(r10)) if r10 else 0.0,
        "latency_median_s": float(statistics.median(lat)) if lat else 0.0,
        "latency_p95_s": float(np.percentile(lat, 95)) if lat else 0.0,
        "ingest_photos_per_s": (run.ingested / run.ingest_s) if run.ingest_s > 0 else 0.0,
        "queries": len(queries),
        "pr_curve": (np.mean(curves, 0) if curves else np.zeros(len(RECALL_LEVELS))).tolist(),
    }


JSON_KEYS = ("map", "precision_at_1", "recall_at_10", "latency_median_s", "latency_p95_s",
             "ingest_photos_per_s", "queries", "by_condition")


def format_table(results: dict[str, dict]) -> str:
    head = (f"{'method':<11} {'mAP':>6} {'P@1':>6} {'R@10':>6} {'lat med (s)':>11} {'lat p95 (s)':>11} "
            f"{'ingest (photos/s)':>17} {'queries':>7}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<11} {r['map']:>6.3f} {r['precision_at_1']:>6.3f} {r['recall_at_10']:>6.3f} "
                     f"{r['latency_median_s']:>11.3f} {r['latency_p95_s']:>11.3f} "
                     f"{r['ingest_photos_per_s']:>17.2f} {r['queries']:>7d}")
    return "\n".join(lines)


def format_conditions(results: dict[str, dict]) -> str:
    """mAP / P@1 per condition and method ("" when no method has conditions)."""
    conds = sorted({c for r in results.values() for c in r.get("by_condition", {})})
    if not conds:
        return ""
    width = max(len("condition"), *(len(c) for c in conds))
    head = f"{'condition':<{width}} {'queries':>7} " + " ".join(f"{m + ' mAP/P@1':>20}" for m in results)
    lines = [head, "-" * len(head)]
    for c in conds:
        cells, n = [], 0
        for r in results.values():
            f = r.get("by_condition", {}).get(c)
            n = max(n, f["queries"] if f else 0)
            cells.append(f"{f['map']:.3f}/{f['precision_at_1']:.3f}" if f else "-")
        lines.append(f"{c:<{width}} {n:>7} " + " ".join(f"{x:>20}" for x in cells))
    return "\n".join(lines)
