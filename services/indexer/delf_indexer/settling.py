"""Milvus Lite: new rows made searchable in the background, not inside the next search.

Lite keeps new rows in a memtable until a flush writes them as a segment, then builds that
segment's index in a background thread. The direct search (``backends.lite_fast``) reads
segments only (a flush first), and searches a segment whose index is not built yet
exactly, which costs little for the few photos an ingest just added; so a search flushes
and does not wait for the build (it used to: a first search after an ingest took the whole
build, 13 s for landmarks-dev; BENCHMARKS.md, "Unchanged photos and the first search").

``IdleFlush`` flushes in a timer thread as soon as an ingest job completes (``now``: the
indexer marked its last item), once other writes pause for ``idle_s`` seconds, and every
``FLUSH_ROWS`` new rows during a long ingest, so that Lite builds each new segment's index
while the ingest goes on: when the job completes, only its last rows (fewer than
``FLUSH_ROWS``) are left to flush and to search exactly. An ingest's steady stream of adds
is not flushed one photo at a time (with CPU extraction they come a second or more apart):
segments of one photo each cost an index build each and would only be merged again by Lite.
After each background flush it runs ``after`` (the store: ``probe_search``), so that the
search path has read the new segment and run faiss before the first real search does.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

IDLE_FLUSH_S = 5.0  # seconds without a write before the background flush
# New rows that are flushed at once: a segment above lite_fast.EXACT_SEGMENT_ROWS (20k) is searched
# through its IVF index once built, one below it exactly (50 photos at 500 stored descriptors).
FLUSH_ROWS = 25_000


class IdleFlush:
    """Calls ``flush`` in a timer thread ``idle_s`` seconds after the last ``wrote()``."""

    def __init__(self, flush: Callable[[], None], idle_s: float = IDLE_FLUSH_S,
                 after: Callable[[], object] | None = None):
        self._flush = flush
        self._after = after
        self.idle_s = idle_s
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self.flushes = 0  # background flushes run (tests, benchmarks)
        self.pending = 0  # rows written since this timer's last flush

    def wrote(self, rows: int = 0) -> None:
        """A write of ``rows`` new rows happened: (re)arm the timer; flush now past FLUSH_ROWS."""
        self.pending += rows
        self._arm(0.0 if self.pending >= FLUSH_ROWS else self.idle_s)

    def now(self) -> None:
        """A batch of writes ended (an ingest job completed): flush in the background now."""
        self._arm(0.0)

    def _arm(self, delay: float) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(delay, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        self.pending = 0
        try:
            self._flush()
            self.flushes += 1
            if self._after is not None:
                self._after()
        except Exception:  # whatever went wrong, the next search flushes anyway
            log.warning("background flush of Milvus Lite failed; the next search flushes", exc_info=True)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


PROBE_ROWS = 32  # query rows of the probe search: enough for faiss' BLAS path, as a real query


def probe_search(store) -> bool:
    """One search with random descriptors, its answer dropped: the store reads every segment's
    columns and faiss runs once, so that the next real search finds them warm (the indexer's
    warm-up at start, and after a background flush). False when the index holds nothing or
    the store was closed meanwhile (a background flush that ran while the store closed)."""
    import numpy as np

    from delf_common.features import DelfFeatures

    with store._lock:
        if store.client is None:
            return False
        pca = store.collection_pca() if store.exists else None
        if pca is None:
            return False
        probe = np.random.default_rng(0).standard_normal((PROBE_ROWS, store.dim)).astype(np.float32)
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        store.search(DelfFeatures(np.zeros((PROBE_ROWS, 2)), np.ones(PROBE_ROWS), np.ones(PROBE_ROWS),
                                  probe, (64, 64), "", pca), shortlist=1)
    return True
