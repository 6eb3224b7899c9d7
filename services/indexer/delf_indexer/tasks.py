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

import redis
from celery.signals import celeryd_after_setup, worker_shutdown

from delf_common import celery_app, contract
from delf_common import parked
from delf_common.celery_app import app, configure_worker
from delf_common.contract import (FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND, ContractError, check_filter,
                                  check_image_id, error, failure, ok)
from delf_common.features import DelfFeatures
from delf_common.jobs import JobStore
from delf_common.metrics import DESCRIPTORS_INDEXED, STORED, install_worker_hooks
from delf_common.retry import retry_delay

from delf_indexer import duplicates
from delf_indexer.listing import list_images
from delf_indexer.settling import probe_search
from delf_indexer.store import DescriptorStore

log = logging.getLogger(__name__)

configure_worker(app)  # publish retries that ride out a Redis restart
install_worker_hooks()  # task counters and timings; /metrics on DELF_METRICS_PORT
MILVUS_CHECK_TIMEOUT_S = 5.0
STORED_EVERY_S = 30.0  # how often the heartbeat recounts what the index holds (delf_index_stored)

_store: DescriptorStore | None = None
_jobs: JobStore | None = None  # one Redis pool per process, not one per ingested photo
_store_lock = threading.Lock()


def get_store() -> DescriptorStore:
    """The process's DescriptorStore, created on first use."""
    global _store
    with _store_lock:
        if _store is None:
            _store = DescriptorStore()
        return _store


def job_store() -> JobStore:
    """The process's JobStore, created on first use."""
    global _jobs
    with _store_lock:
        if _jobs is None:
            _jobs = JobStore()
        return _jobs


def reset_store() -> None:
    """Close the process's store and forget its job store (tests; worker shutdown)."""
    global _store, _jobs
    with _store_lock:
        _jobs = None
        if _store is not None:
            _store.close()
            _store = None


def milvus_reachable() -> None:
    """The worker heartbeat's "milvus" check (gateway health): raises when Milvus does not
    answer. Opens the store on first use, as the first task would."""
    client = get_store().client
    if client is None:
        raise RuntimeError("the descriptor store is closed")
    client.list_collections(timeout=MILVUS_CHECK_TIMEOUT_S)
    _count_stored()


_stored_at = [float("-inf")]  # when delf_index_stored was last counted (time.monotonic)


def _count_stored(stats: dict | None = None) -> None:
    """Sets delf_index_stored (images, descriptors): from `stats` when given, else by
    counting, at most every STORED_EVERY_S (the heartbeat calls it every few seconds)."""
    import time

    if stats is None:
        if time.monotonic() - _stored_at[0] < STORED_EVERY_S:
            return
        stats = get_store().stats()
    _stored_at[0] = time.monotonic()
    for what in ("images", "descriptors"):
        STORED.labels(what).set(int(stats.get(what, 0)))


celery_app.HEARTBEAT_CHECKS["milvus"] = milvus_reachable


@celeryd_after_setup.connect
def warm_up(**_kwargs) -> None:
    """Before the worker answers pings: open the store (Milvus Lite starts its server and
    loads the collections) and run one search, so that pending rows are indexed and Lite's
    segments read before the first real search (issue 14, item 8)."""
    import time

    t = time.perf_counter()
    try:
        searched = probe_search(get_store())
    except Exception:  # Milvus away: the heartbeat reports it, tasks retry
        log.exception("warm-up failed")
        return
    log.info("warmed up: store open%s in %.1f s", ", one search" if searched else "", time.perf_counter() - t)


@worker_shutdown.connect
def _close_store(**_kwargs) -> None:
    """Warm shutdown: flush Milvus Lite and release its file for the next indexer."""
    try:
        reset_store()
    except Exception:  # shutting down anyway
        log.exception("closing the descriptor store failed")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Failures worth retrying: Redis (job store) or a Milvus server unreachable for a while.
    Never bad input: that is answered with an error dict and never raises."""
    errors: list[type[BaseException]] = [redis.ConnectionError, redis.TimeoutError]
    try:
        from pymilvus.exceptions import MilvusUnavailableException

        errors.append(MilvusUnavailableException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


TRANSIENT_ERRORS = _transient_errors()
MAX_RETRIES = 12         # ~4-5 minutes in all (retry_delay: 1, 2, 4 .. 30 s), then the item is marked failed


def _not_found(image_id) -> dict:
    return error(NOT_FOUND, f"no indexed image with id {image_id!r}")


def _features(wire) -> DelfFeatures:
    return DelfFeatures.from_wire(wire)


def _bad_id(image_id) -> dict | None:
    """The error reply for what is not an image id (the gateway's rule), or None."""
    try:
        check_image_id(image_id)
    except ContractError as exc:
        return error(exc.code, str(exc))
    return None


def _add(image_id, wire, metadata, thumbnail=None, sha256=None) -> dict:
    """Index one photo; ``sha256``: of its bytes as submitted, kept with it. A photo whose
    bytes another id holds is reported (``duplicate_of``) and, with DELF_DUPLICATES=skip,
    not indexed (``skipped``)."""
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        features = _features(wire)
        same = duplicates.duplicate_of(get_store(), image_id, sha256)
    except (ValueError, KeyError, TypeError) as exc:
        return error(INVALID_ARGUMENT, f"malformed features or hash: {exc}")
    if same and duplicates.skip_duplicates(get_store()):
        info = {"image_id": image_id, "metadata": dict(metadata or {}), "width": features.image_size[0],
                "height": features.image_size[1], "num_features": 0, "pca_id": features.pca_id}
        return ok(image={**info, "sha256": sha256, "duplicate_of": same, "skipped": True})
    try:
        hashes = {image_id: sha256} if sha256 else None
        info = get_store().add_many([(image_id, features, metadata or {}, thumbnail)], hashes)[0]
    except ContractError as exc:  # metadata over the limits (the gateway checks them first)
        return error(exc.code, str(exc))
    except ValueError as exc:
        return error(FAILED_PRECONDITION, str(exc))
    DESCRIPTORS_INDEXED.inc(int(info.get("num_features", len(features))))
    return ok(image={**info, "duplicate_of": same, "skipped": False})


@app.task(name=contract.INDEX_ADD)
def index_add(image_id, features, metadata=None, thumbnail=None, sha256=None) -> dict:
    """``thumbnail``: the photo's JPEG thumbnail (the extractor's), stored with it;
    ``sha256``: of the photo's bytes as submitted (duplicates)."""
    return _add(image_id, features, metadata, thumbnail or None, sha256)


@app.task(name=contract.INDEX_KNOWN)
def index_known(items) -> dict:
    """For each ``{image_id, sha256, metadata}``: whether that id already holds these bytes
    and metadata (``unchanged``) and which other ids hold these bytes (``duplicate_of``)."""
    try:
        for item in items or ():
            if (err := _bad_id(item.get("image_id"))) is not None:
                return err
        return ok(known=duplicates.known(get_store(), list(items or ())))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return error(INVALID_ARGUMENT, f"malformed items: {exc}")


def _remove_orphans(image_id: str) -> None:
    """Descriptor rows left by an add of a *new* image that died between inserting them
    and writing the images row (worker killed, Milvus lost): the store's next add of
    that id only replaces other generations when the images row exists, so they would
    stay forever, counted in the stats. Only called for a task seen before (redelivered
    or retried): a filter delete scans the collection."""
    store = get_store()
    try:
        store.get(image_id)
        return  # the images row exists: add() replaces every other generation
    except KeyError:
        pass
    try:
        store.delete(image_id)  # removes the orphans, then raises KeyError (no images row)
    except KeyError:
        pass


# Ingest results are never read (the job store records progress): not stored in
# the result backend, where each would hold a photo's features for an hour.
@app.task(name=contract.INGEST_INDEX, bind=True, ignore_result=True)
def ingest_index(self, extracted, job_id) -> dict:
    image_id = (extracted or {}).get("image_id") or ""
    try:
        return _ingest_index(self, extracted, job_id, image_id)
    except TRANSIENT_ERRORS as exc:
        retries = self.request.retries or 0
        if retries >= MAX_RETRIES:
            log.error("job %s: item %s failed after %d retries: %s", job_id, image_id, retries, exc)
            try:
                job_store().mark_failed(job_id, image_id, f"indexer unavailable: {type(exc).__name__}: {exc}")
            except redis.RedisError:
                pass  # still down: the task fails; the job cannot record it
            raise
        delay = retry_delay(retries)
        log.warning("job %s: item %s: %s: %s; retry %d in %.1f s", job_id, image_id,
                    type(exc).__name__, exc, retries + 1, delay)
        raise self.retry(exc=exc, countdown=delay, max_retries=MAX_RETRIES) from exc


def _ingest_index(task, extracted, job_id, image_id) -> dict:
    jobs = job_store()
    claim = parked.is_reference(extracted)  # the features wait in the job (delf_common.parked)
    resent = claim and bool(extracted.get("resent"))
    if jobs.is_cancelled(job_id):
        jobs.mark_failed(job_id, image_id, "job cancelled")
        if claim:
            jobs.unpark(job_id, image_id)  # a resume extracts it again
        return error(FAILED_PRECONDITION, "job cancelled")
    if (failed := failure(extracted, INVALID_ARGUMENT, "extraction failed")) is not None:
        jobs.mark_failed(job_id, image_id, failed.message)  # errors are never parked
        return error(failed.code, failed.message)
    if claim:
        payload = None if jobs.is_finished(job_id, image_id) else jobs.parked(job_id, image_id)
        if payload is None:  # a duplicate reference (resent, redelivered): nothing to do
            jobs.unpark(job_id, image_id)
            return ok(image_id=image_id, skipped="already recorded")
        extracted = payload
    request = task.request
    if (request.retries or (request.delivery_info or {}).get("redelivered") or resent) and _bad_id(image_id) is None:
        _remove_orphans(image_id)
    result = _add(image_id, extracted.get("features"), extracted.get("metadata"), extracted.get("thumbnail"),
                  extracted.get("sha256"))
    if failure(result) is None:
        image = result["image"]
        if jobs.mark_done(job_id, image_id, duplicate_of=(image["duplicate_of"] or [""])[0],
                          skipped=image["skipped"]):
            get_store().batch_done()  # the job's last item: Lite indexes its rows now
    else:
        jobs.mark_failed(job_id, image_id, result["error"]["message"])
    if claim:
        jobs.unpark(job_id, image_id)  # recorded: a reference sent again is now a no-op
    return result


@app.task(name=contract.INDEX_SEARCH)
def index_search(features, options=None) -> dict:
    options = options or {}
    try:
        feats = _features(features)
    except (ValueError, KeyError, TypeError) as exc:
        return error(INVALID_ARGUMENT, f"malformed features: {exc}")
    shortlist = options.get("shortlist")
    try:
        filter = check_filter(options.get("filter") or None)
    except ValueError as exc:
        return error(INVALID_ARGUMENT, f"bad filter: {exc}")
    try:
        candidates = get_store().search(
            feats, shortlist=None if shortlist is None else int(shortlist),  # 0 counts: no candidates
            exclude=options.get("exclude") or (), filter=filter)
    except ValueError as exc:
        return error(FAILED_PRECONDITION, str(exc))
    return ok(candidates=candidates)


@app.task(name=contract.INDEX_GET)
def index_get(image_id, options=None) -> dict:
    """``options`` ``{"thumbnail": True}``: also ``thumbnail`` (JPEG bytes, b"" when none)."""
    if (err := _bad_id(image_id)) is not None:
        return err
    want = bool((options or {}).get("thumbnail"))
    try:
        info = get_store().get(image_id, thumbnail=want)
    except KeyError:
        return _not_found(image_id)
    return ok(image=info, thumbnail=info.pop("thumbnail")) if want else ok(image=info)


@app.task(name=contract.INDEX_FEATURES)
def index_features(image_id) -> dict:
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        info, feats = get_store().get_features(image_id)
    except KeyError:
        return _not_found(image_id)
    return ok(image=info, features=feats.to_wire())


@app.task(name=contract.INDEX_DELETE)
def index_delete(image_id) -> dict:
    if (err := _bad_id(image_id)) is not None:
        return err
    try:
        return ok(descriptors_removed=get_store().delete(image_id))
    except KeyError:
        return _not_found(image_id)


@app.task(name=contract.INDEX_STATS)
def index_stats() -> dict:
    stats = get_store().stats()
    _count_stored(stats)
    return ok(**stats)


@app.task(name=contract.INDEX_LIST)
def index_list(options=None) -> dict:
    """One page of the indexed images in id order: ``options`` ``{after: id or "", limit: n,
    filter: {key: value}}`` -> ``images`` (infos), ``next`` (the id the next page starts after, "": none)."""
    options = options or {}
    try:
        images, after = list_images(get_store(), after=options.get("after") or "",
                                   limit=int(options.get("limit") or 100), filter=options.get("filter") or None)
    except ContractError as exc:
        return error(exc.code, str(exc))
    except (ValueError, TypeError) as exc:
        return error(INVALID_ARGUMENT, str(exc))
    return ok(images=images, next=after)
