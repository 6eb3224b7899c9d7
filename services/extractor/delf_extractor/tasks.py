"""Celery tasks of the extract queue.

Run a worker with::

    celery -A delf_extractor.tasks worker -Q <DELF_QUEUE_PREFIX>.extract --pool solo --prefetch-multiplier 1

(``--pool solo``: CUDA cannot be used in forked children). The model is loaded
once per worker process, at ``worker_process_init`` (sent by the solo pool too)
or on the first task, whichever comes first.

Return values follow docs/CONTRACTS.md: ``{"ok": True, ...}`` or, for a photo
that cannot be used, ``{"ok": False, "error": {"code", "message"}}``.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time

from celery.signals import worker_process_init

from delf_common import config
from delf_common.celery_app import EXTRACT, INGEST_EXTRACT, app, configure_worker
from delf_common.images import INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ImageRejected, decode_image
from delf_common.jobs import JobStore
from delf_common.metrics import install_worker_hooks

log = logging.getLogger(__name__)

configure_worker(app)  # publish retries that ride out a Redis restart
install_worker_hooks()  # task counters and timings; /metrics on DELF_METRICS_PORT

_extractor = None
_lock = threading.Lock()


def get_extractor():
    """The worker process's extractor (DELF_MODEL on DELF_DEVICE), created on first use."""
    global _extractor
    if _extractor is None:
        with _lock:
            if _extractor is None:
                from delf_extractor.extract import DelfExtractor

                t = time.perf_counter()
                ex = DelfExtractor()
                log.info("extractor ready: model %s, pca %s, device %s (%.1f s)",
                         ex.model_name, ex.pca_id, ex.device, time.perf_counter() - t)
                _extractor = ex
    return _extractor


_jobs: JobStore | None = None


def _job_store() -> JobStore:
    global _jobs
    if _jobs is None:
        _jobs = JobStore()
    return _jobs


@worker_process_init.connect
def _load_model(**_kwargs) -> None:
    get_extractor()


# --------------------------------------------------------------------------- locations


def _refuse(code: str, message: str) -> ImageRejected:
    return ImageRejected(code, message)


def resolve_location(location: str, roots: tuple[str, ...] | None = None) -> str:
    """The real path of an ingest ``location``, which must lie inside one of DELF_INGEST_ROOTS.

    A relative location is looked up under each root in turn. Refused: ``..``
    components, URLs, paths outside every root, and symlinks that lead out of the
    root (checked on the fully resolved path).
    """
    roots = config.get("DELF_INGEST_ROOTS") if roots is None else roots
    if not roots:
        raise _refuse(INVALID_ARGUMENT, "photo locations are not accepted here: DELF_INGEST_ROOTS is empty; "
                                        "send the image bytes instead")
    if not isinstance(location, str) or not location or "\x00" in location:
        raise _refuse(INVALID_ARGUMENT, f"invalid location {location!r}")
    if "://" in location:
        raise _refuse(INVALID_ARGUMENT, f"location {location!r}: only local file paths are accepted")
    if ".." in location.replace("\\", "/").split("/"):
        raise _refuse(INVALID_ARGUMENT, f"location {location!r}: '..' is not allowed")
    real_roots = [os.path.realpath(r) for r in roots]

    def inside(path: str) -> bool:
        return any(os.path.commonpath([root, path]) == root for root in real_roots)

    candidates = [location] if os.path.isabs(location) else [os.path.join(r, location) for r in real_roots]
    for cand in candidates:
        real = os.path.realpath(cand)
        if not inside(real):
            if inside(os.path.abspath(cand)):
                raise _refuse(INVALID_ARGUMENT, f"location {location!r} leads outside the ingest roots "
                                                f"through a symbolic link")
            raise _refuse(INVALID_ARGUMENT, f"location {location!r} is outside the ingest roots "
                                            f"(DELF_INGEST_ROOTS)")
        if os.path.exists(real):
            if not os.path.isfile(real):
                raise _refuse(INVALID_ARGUMENT, f"location {location!r} is not a regular file")
            return real
    raise _refuse(NOT_FOUND, f"location {location!r} not found under the ingest roots")


def read_location(location: str, roots: tuple[str, ...] | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of an ingest location, refusing files over DELF_MAX_IMAGE_BYTES without reading them."""
    max_bytes = config.get("DELF_MAX_IMAGE_BYTES") if max_bytes is None else max_bytes
    path = resolve_location(location, roots)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise _refuse(NOT_FOUND, f"location {location!r} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symlink after the check
            raise _refuse(INVALID_ARGUMENT, f"location {location!r} is a symbolic link") from None
        raise _refuse(INVALID_ARGUMENT, f"location {location!r} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise _refuse(RESOURCE_EXHAUSTED, f"location {location!r} is {size:,} bytes; the limit is "
                                              f"{max_bytes:,} bytes (DELF_MAX_IMAGE_BYTES)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise _refuse(RESOURCE_EXHAUSTED, f"location {location!r} is over the limit of {max_bytes:,} bytes "
                                          f"(DELF_MAX_IMAGE_BYTES)")
    return data


def _item_bytes(item: dict) -> bytes:
    image, location = item.get("image"), item.get("location")
    if image and location:
        raise _refuse(INVALID_ARGUMENT, "give either the image bytes or a location, not both")
    if location:
        return read_location(location)
    if image is None:
        raise _refuse(INVALID_ARGUMENT, "the item has neither image bytes nor a location")
    if not isinstance(image, (bytes, bytearray)):
        raise _refuse(INVALID_ARGUMENT, f"image must be bytes, got {type(image).__name__}")
    return bytes(image)


# --------------------------------------------------------------------------- tasks


def _features_wire(rgb) -> dict:
    t = time.perf_counter()
    feats = get_extractor().extract(rgb)
    log.debug("extracted %d features from %dx%d in %.2f s", len(feats), rgb.shape[1], rgb.shape[0],
              time.perf_counter() - t)
    return feats.to_wire()


@app.task(name=EXTRACT)
def extract(image: bytes | None, options: dict | None = None) -> dict:
    """Features of one photo: ``{"ok": True, "features": wire}``. ``options`` is reserved."""
    try:
        if image is None:
            raise _refuse(INVALID_ARGUMENT, "no image bytes given")
        rgb = decode_image(bytes(image))
    except ImageRejected as exc:
        return {"ok": False, "error": exc.to_dict()}
    return {"ok": True, "features": _features_wire(rgb)}


# The result goes to delf.ingest.index as the next step of the chain and is never read
# from the result backend: do not store it there (it holds a photo's features, and a
# Redis restart at that moment would fail the task after the work was done).
@app.task(name=INGEST_EXTRACT, ignore_result=True)
def ingest_extract(item: dict, job_id: str) -> dict:
    """One bulk-ingest item -> ``{"ok": True, "image_id", "metadata", "features"}`` for delf.ingest.index."""
    image_id = item.get("image_id")
    if _job_store().is_cancelled(job_id):  # skip the work; the index step records the item
        return {"ok": False, "image_id": image_id, "error": {"code": "CANCELLED", "message": "job cancelled"}}
    try:
        rgb = decode_image(_item_bytes(item))
    except ImageRejected as exc:
        log.info("job %s: item %s refused: %s", job_id, image_id, exc.message)
        return {"ok": False, "image_id": image_id, "error": exc.to_dict()}
    return {"ok": True, "image_id": image_id, "metadata": dict(item.get("metadata") or {}),
            "features": _features_wire(rgb)}
