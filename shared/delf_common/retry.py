"""Backoff between retries of a task that hit a transient failure (a URL fetch that
failed for now, Redis or Milvus unavailable for a moment), shared by the workers."""
from __future__ import annotations

import random

RETRY_BASE_S = 1.0       # first retry after ~1 s, doubling ...
RETRY_MAX_S = 30.0       # ... up to 30 s apart


def retry_delay(retries: int, retry_after: float | None = None) -> float:
    """Backoff before the `retries`-th retry (0-based): 1, 2, 4 .. 30 s with jitter (x0.5-1);
    a server's Retry-After is honoured up to RETRY_MAX_S."""
    if retry_after is not None and retry_after >= 0:
        return min(RETRY_MAX_S, retry_after)
    return random.uniform(0.5, 1.0) * min(RETRY_MAX_S, RETRY_BASE_S * 2 ** retries)
