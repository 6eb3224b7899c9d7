"""The storage backends of the descriptor store, by kind, and the one choice among them.

``BACKENDS`` maps a kind to its class (each implements ``base.StorageBackend``);
``backend_for(uri)`` picks the first whose ``claims(uri)`` is true, once, when a store opens
(``DescriptorStore``: ``DELF_MILVUS_URI``, else the Lite file under ``DELF_DATA_DIR``).
A new backend is one new module here and one line below, before ``lite``, which takes any
file path.
"""
from __future__ import annotations

from delf_indexer.backends.base import StorageBackend
from delf_indexer.backends.lite import LiteBackend
from delf_indexer.backends.server import ServerBackend
from delf_indexer.settings import IndexSettings

BACKENDS: dict[str, type[StorageBackend]] = {
    "server": ServerBackend,  # http(s)://, tcp://, unix: a Milvus server
    "lite": LiteBackend,  # a file path: Milvus Lite in this process (last: it claims any path)
}


def backend_for(uri: str) -> type[StorageBackend]:
    """The backend class of a Milvus URI."""
    return next(cls for cls in BACKENDS.values() if cls.claims(uri))


def index_for(uri: str, index_type: str | None = None, search_params: dict | None = None) -> IndexSettings:
    """The vector index a new collection at ``uri`` gets (its backend's ``index_settings``)."""
    return backend_for(uri).index_settings(index_type, search_params)
