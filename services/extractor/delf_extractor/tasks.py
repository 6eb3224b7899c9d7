"""Celery tasks of the extract queue, and the worker signals that load the model.

Run a worker with::

    celery -A delf_extractor.tasks worker -Q <DELF_QUEUE_PREFIX>.extract --pool threads --prefetch-multiplier 1

(threads, not prefork: CUDA cannot be used in forked children; ``--pool solo`` works
too, one photo at a time). The model is loaded once per worker process, and run once on a
small picture (`warm_up`), when the worker starts (``celeryd_after_setup`` for thread pools,
``worker_process_init`` for solo), before it answers pings: ready means fast.

Each task reads its photo (`delf_extractor.sources`) in its own thread and hands the
pixels to the process's batcher (`delf_extractor.batcher`), which runs the network on
several photos at a time; acknowledgement comes after the task (``task_acks_late``).
Search-time photos (``delf.extract``) skip the batch wait.

Return values follow docs/CONTRACTS.md (the envelope of delf_common.contract):
``ok(...)`` or, for a photo that cannot be used, ``error(code, message)``.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time

from celery.signals import celeryd_after_setup, worker_process_init

from delf_common import fetch, parked
from delf_common.celery_app import app, configure_worker
from delf_common.contract import CANCELLED, EXTRACT, INGEST_EXTRACT, INVALID_ARGUMENT, error, ok
from delf_common.images import ImageRejected, check_not_flat, decode_image, thumbnail_jpeg
from delf_common.jobs import JobStore
from delf_common.metrics import install_worker_hooks
from delf_common.retry import retry_delay
from delf_extractor import batcher
from delf_extractor.batcher import Batcher, worker_threads
from delf_extractor.memory import tune_malloc
from delf_extractor.settings import ExtractorSettings
from delf_extractor.sources import item_bytes

log = logging.getLogger(__name__)

_settings: ExtractorSettings | None = None


def settings() -> ExtractorSettings:
    """The worker process's settings, read from the environment once (here at import, for the
    two lines below; tests that change the environment set ``_settings`` to None)."""
    global _settings
    if _settings is None:
        _settings = ExtractorSettings.from_env()
    return _settings


configure_worker(app)  # publish retries that ride out a Redis restart
tune_malloc(settings().malloc_tune)  # DELF_MALLOC_TUNE: before the pool's threads take malloc arenas
install_worker_hooks()  # task counters and timings; /metrics on DELF_METRICS_PORT
app.conf.worker_concurrency = worker_threads(settings())  # the --pool threads worker's threads

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
                ex = DelfExtractor(settings=settings())
                log.info("extractor ready: model %s, pca %s, device %s (%.1f s)",
                         ex.model_name, ex.pca_id, ex.device, time.perf_counter() - t)
                _extractor = ex
    return _extractor


def get_batcher() -> Batcher:
    """The worker process's batcher, running this process's extractor (`get_extractor`)."""
    return batcher.get_batcher(get_extractor, settings())


_jobs: JobStore | None = None


def _job_store() -> JobStore:
    global _jobs
    if _jobs is None:
        _jobs = JobStore()
    return _jobs


def warm_up() -> None:
    """Loads the model and runs it once, as a search does (outside the batch statistics), on a small
    textured picture: the first real photo then meets a network whose kernels, buffers and
    threads are ready (issue 14, item 8: the first search after start took seconds more)."""
    get_extractor()
    t = time.perf_counter()
    try:
        import numpy as np

        rng = np.random.default_rng(0)
        picture = (rng.random((96, 128, 3)) * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
        get_batcher().warm_up(picture)
    except Exception:  # a worker that cannot warm up still serves, slowly at first
        log.exception("warm-up pass failed")
        return
    log.info("warmed up: one pass of the network in %.1f s", time.perf_counter() - t)


@worker_process_init.connect
def _load_model(**_kwargs) -> None:
    warm_up()


@celeryd_after_setup.connect
def _load_model_in_thread_pool(instance=None, **_kwargs) -> None:
    """Thread pools send no worker_process_init: load the model and warm it up before the
    worker says ready (logging is set up by then; never in a prefork parent: CUDA does not
    survive the fork)."""
    pool = getattr(instance, "pool_cls", "")
    pool = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "thread" in str(pool):
        warm_up()


def _features_wire(rgb, urgent: bool = False, slot=None) -> dict:
    """The photo's features on the wire; a photo of one flat colour, or one that yields no
    features (too small for the network), is refused (ImageRejected, INVALID_ARGUMENT)."""
    check_not_flat(rgb)
    t = time.perf_counter()
    feats = get_batcher().submit(rgb, urgent=urgent, slot=slot)
    log.debug("extracted %d features from %dx%d in %.2f s", len(feats), rgb.shape[1], rgb.shape[0],
              time.perf_counter() - t)
    if len(feats) == 0:
        raise ImageRejected(INVALID_ARGUMENT, _no_features_reason(rgb.shape[1], rgb.shape[0]))
    return feats.to_wire()


def _no_features_reason(width: int, height: int) -> str:
    ex = get_extractor()
    work_w, work_h = ex.working_size(width, height)
    scaled = "" if (work_w, work_h) == (width, height) else (
        f" ({work_w}x{work_h} once its longer side is reduced to {ex.cfg.max_image_side} px)")
    return (f"the photo gives no features: it is {width}x{height}{scaled}, and the extractor needs "
            f"its shorter side to be at least {ex.smallest_side()} px (model {ex.model_name})")


def _with_thumbnail(reply: dict, rgb) -> dict:
    """The reply with the photo's ``thumbnail`` (JPEG bytes, DELF_THUMBNAIL_SIDE), unless
    thumbnails are off."""
    thumbnail = thumbnail_jpeg(rgb, settings().thumbnail_side)
    if thumbnail:
        reply["thumbnail"] = thumbnail
    return reply


@app.task(name=EXTRACT)
def extract(image: bytes | None, options: dict | None = None) -> dict:
    """Features of one photo: ``{"ok": True, "features": wire}``; with ``options``
    ``{"thumbnail": True}`` (AddImage) also its ``thumbnail``."""
    try:
        if image is None:
            raise ImageRejected(INVALID_ARGUMENT, "no image bytes given")
        rgb = decode_image(bytes(image), settings().image_limits)
        reply = ok(features=_features_wire(rgb, urgent=True))
        return _with_thumbnail(reply, rgb) if (options or {}).get("thumbnail") else reply
    except ImageRejected as exc:
        return error(exc.code, exc.message)


# The result goes to delf.ingest.index as the next step of the chain and is never read
# from the result backend: do not store it there (a Redis restart at that moment would
# fail the task after the work was done). The features themselves wait in the job
# (delf_common.parked: a lost index message is re-sent from there, not extracted again).
# URL items: transient fetch failures (connection errors, timeouts, HTTP 5xx/429) are retried
# with backoff (1, 2, 4, 8, 16 s, jitter; Retry-After honoured up to 30 s), then the item fails.
FETCH_MAX_RETRIES = 5


@app.task(name=INGEST_EXTRACT, ignore_result=True)
def ingest_extract(item: dict, job_id: str) -> dict:
    """One bulk-ingest item -> its features, metadata, thumbnail (none when DELF_THUMBNAIL_SIDE
    is 0) and the sha256 of its bytes (duplicates) parked in the job (delf_common.parked), and ``{"ok": True, "image_id", "parked": True}``
    for delf.ingest.index; an error is not parked."""
    image_id = item.get("image_id")
    if _job_store().is_cancelled(job_id):  # skip the work; the index step records the item
        return error(CANCELLED, "job cancelled", image_id=image_id)
    with get_batcher().slot() as slot:  # a partial batch may wait for this photo
        try:
            data = item_bytes(item, settings())
            rgb = decode_image(data, settings().image_limits)
            features = _features_wire(rgb, slot=slot)
        except ImageRejected as exc:
            log.info("job %s: item %s refused: %s", job_id, image_id, exc.message)
            return error(exc.code, exc.message, image_id=image_id)
        except fetch.FetchError as exc:
            return _fetch_failed(exc, image_id, job_id)
        extracted = _with_thumbnail({"metadata": dict(item.get("metadata") or {}), "features": features,
                                     "sha256": hashlib.sha256(data).hexdigest()}, rgb)
    return parked.park(_job_store(), job_id, image_id, extracted)


def _fetch_failed(exc: fetch.FetchError, image_id, job_id: str) -> dict:
    """A URL item's fetch failed: retry the task (transient, tries left) or fail the item."""
    request = ingest_extract.request  # this delivery's context (no id when called directly)
    retries = request.retries or 0
    if exc.transient and request.id and retries < FETCH_MAX_RETRIES:
        delay = retry_delay(retries, exc.retry_after)
        log.warning("job %s: item %s: %s; retry %d in %.1f s", job_id, image_id, exc.message,
                    retries + 1, delay)
        raise ingest_extract.retry(countdown=delay, max_retries=FETCH_MAX_RETRIES) from None
    message = exc.message + (f" (after {retries + 1} tries)" if exc.transient else "")
    log.info("job %s: item %s refused: %s", job_id, image_id, message)
    return error(exc.code, message, image_id=image_id)
