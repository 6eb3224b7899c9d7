"""Duplicates in the CLI: what a job says about identical photos (``job_outcomes``)."""
from __future__ import annotations


def job_outcomes(job) -> str:
    """The end of a job's summary line: its unchanged items and duplicates, when any."""
    parts = []
    if job.unchanged:
        parts.append(f"unchanged {job.unchanged}")
    if job.duplicates:
        skipped = f" ({job.duplicates_skipped} skipped)" if job.duplicates_skipped else ""
        parts.append(f"duplicates {job.duplicates}{skipped}")
    return "".join("  " + p for p in parts)
