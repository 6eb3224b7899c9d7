"""Which Milvus Lite versions the fast paths may touch.

`delf_indexer.backends.lite_fast` (direct reads and writes) and
`delf_indexer.backends.lite_patches` (flush,
k-means and AllocTimestamp patches) use names Milvus Lite does not promise to keep. They
run only on the versions listed here, the ones they were tested with; on any other version
the indexer uses Lite's public API (the same answers, slower searches and writes) and says
so once. Add a version here only after the whole suite passed on it.
"""
from __future__ import annotations

import functools
import logging
from importlib import metadata

log = logging.getLogger(__name__)

TESTED_LITE_VERSIONS = ("3.2.2",)


def installed_lite_version() -> str | None:
    try:
        return metadata.version("milvus-lite")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def lite_internals_allowed() -> bool:
    """True when the installed milvus-lite is one the fast paths were tested with; else
    logs one warning (per process) and answers False."""
    version = installed_lite_version()
    if version in TESTED_LITE_VERSIONS:
        return True
    log.warning("milvus-lite %s is not a version the indexer's fast paths were tested with (%s): "
                "using Milvus Lite's public API instead (same results, slower searches and writes)",
                version, ", ".join(TESTED_LITE_VERSIONS))
    return False
