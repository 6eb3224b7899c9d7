"""Celery tasks of the indexer (``delf.index.*`` and ``delf.ingest.index``), per docs/CONTRACTS.md.

Worker::

    celery -A delf_indexer.tasks worker -Q <DELF_QUEUE_PREFIX>.index --pool solo

Milvus Lite (the default) runs inside the worker process and one Lite file may be
opened by one process only, hence ``--pool solo`` (``--pool threads`` is also safe:
the store serialises its calls). With ``DELF_MILVUS_URI=http://...`` any number of
workers, with any pool, may share the server.
"""
from __future__ import annotations

import logging
import threading

from delf_common import celery_app as names
from delf_common.celery_app import app
from delf_common.features import DelfFeatures
from delf_common.jobs import JobStore

from delf_indexer.store import DescriptorStore

log = logging.getLogger(__name__)

INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
FAILED_PRECONDITION = "FAILED_PRECONDITION"

_store: DescriptorStore | None = None
_store_lock = threading.Lock()


def get_store() -> DescriptorStore:
    """The process's DescriptorStore, created on first use."""
    global _store
    with _store_lock:
        if _store is None:
            _store = DescriptorStore()
        return _store


def reset_store() -> None:
    """Close the process's store (tests; worker shutdown)."""
    global _store
    with _store_lock:
        if _store is not None:
            _store.close()
            _store = None


def _error(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}


def _not_found(image_id) -> dict:
    return _error(NOT_FOUND, f"no indexed image with id {image_id!r}")


def _features(wire) -> DelfFeatures:
    return DelfFeatures.from_wire(wire)


def _bad_id(image_id) -> dict | None:
    if not isinstance(image_id, str) or not image_id:
        return _error(INVALID_ARGUMENT, "image_id must be a non-empty string")
    if len(image_id.encode("utf-8")) > 512:
        return _error(INVALID_ARGUMENT, "image_id is longer than 512 bytes (UTF-8)")
    return None


def _add(image_id, wire, metadata) -> dict:
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        features = _features(wire)
    except (ValueError, KeyError, TypeError) as exc:
        return _error(INVALID_ARGUMENT, f"malformed features: {exc}")
    try:
        info = get_store().add(image_id, features, metadata or {})
    except ValueError as exc:
        return _error(FAILED_PRECONDITION, str(exc))
    return {"ok": True, "image": info}


@app.task(name=names.INDEX_ADD)
def index_add(image_id, features, metadata=None) -> dict:
    return _add(image_id, features, metadata)


@app.task(name=names.INGEST_INDEX)
def ingest_index(extracted, job_id) -> dict:
    jobs = JobStore()
    image_id = (extracted or {}).get("image_id") or ""
    if jobs.is_cancelled(job_id):
        jobs.mark_failed(job_id, image_id, "job cancelled")
        return _error(FAILED_PRECONDITION, "job cancelled")
    if not extracted.get("ok"):
        err = extracted.get("error") or {}
        jobs.mark_failed(job_id, image_id, err.get("message") or err.get("code") or "extraction failed")
        return {"ok": False, "error": {"code": err.get("code", INVALID_ARGUMENT),
                                       "message": err.get("message", "extraction failed")}}
    result = _add(image_id, extracted.get("features"), extracted.get("metadata"))
    if result["ok"]:
        jobs.mark_done(job_id, image_id)
    else:
        jobs.mark_failed(job_id, image_id, result["error"]["message"])
    return result


@app.task(name=names.INDEX_SEARCH)
def index_search(features, options=None) -> dict:
    options = options or {}
    try:
        feats = _features(features)
    except (ValueError, KeyError, TypeError) as exc:
        return _error(INVALID_ARGUMENT, f"malformed features: {exc}")
    shortlist = options.get("shortlist")
    try:
        candidates = get_store().search(
            feats, shortlist=None if shortlist in (None, 0) else int(shortlist),
            exclude=options.get("exclude") or ())
    except ValueError as exc:
        return _error(FAILED_PRECONDITION, str(exc))
    return {"ok": True, "candidates": candidates}


@app.task(name=names.INDEX_GET)
def index_get(image_id) -> dict:
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        return {"ok": True, "image": get_store().get(image_id)}
    except KeyError:
        return _not_found(image_id)


@app.task(name=names.INDEX_FEATURES)
def index_features(image_id) -> dict:
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        info, feats = get_store().get_features(image_id)
    except KeyError:
        return _not_found(image_id)
    return {"ok": True, "image": info, "features": feats.to_wire()}


@app.task(name=names.INDEX_DELETE)
def index_delete(image_id) -> dict:
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        return {"ok": True, "descriptors_removed": get_store().delete(image_id)}
    except KeyError:
        return _not_found(image_id)


@app.task(name=names.INDEX_STATS)
def index_stats() -> dict:
    return {"ok": True, **get_store().stats()}
