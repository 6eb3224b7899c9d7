"""Celery tasks of the extract queue.

Run a worker with::

    celery -A delf_extractor.tasks worker -Q <DELF_QUEUE_PREFIX>.extract --pool threads --prefetch-multiplier 1

(threads, not prefork: CUDA cannot be used in forked children; ``--pool solo`` works
too, one photo at a time). The model is loaded once per worker process, when the
worker starts (``celeryd_after_setup`` for thread pools, ``worker_process_init`` for solo) or
on the first task, whichever comes first.

Batching (DELF_WORKER_BATCH, DELF_WORKER_BATCH_WAIT_MS): the worker runs 2 x
DELF_WORKER_BATCH tasks at once, each an ordinary Celery task with its own message,
acknowledgement (after the task, ``task_acks_late``), retries and result. A task reads
and decodes its photo in its own thread, then hands the pixels to the process's
`Batcher`, whose single thread runs the network on up to DELF_WORKER_BATCH photos at a
time (`DelfExtractor.extract_batch`: photos of equal size share each forward pass) and
gives each task its own features. So one batch is in the network while the next is
being read, a worker killed mid-batch leaves every one of its messages unacknowledged
(redelivered), and a bad photo fails only its own task. Search-time photos
(``delf.extract``) skip the wait: they go into the next forward pass on their own.

Return values follow docs/CONTRACTS.md: ``{"ok": True, ...}`` or, for a photo
that cannot be used, ``{"ok": False, "error": {"code", "message"}}``.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from concurrent.futures import Future

from celery.signals import celeryd_after_setup, worker_process_init

from delf_common import config, fetch
from delf_common.celery_app import EXTRACT, INGEST_EXTRACT, app, configure_worker
from delf_common.images import INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ImageRejected, decode_image
from delf_common.jobs import JobStore
from delf_common.metrics import install_worker_hooks
from delf_extractor.memory import tune_malloc

log = logging.getLogger(__name__)

configure_worker(app)  # publish retries that ride out a Redis restart
tune_malloc()  # DELF_MALLOC_TUNE: before the pool's threads take malloc arenas
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


@celeryd_after_setup.connect
def _load_model_in_thread_pool(instance=None, **_kwargs) -> None:
    """Thread pools send no worker_process_init: load the model before the worker says ready
    (logging is set up by then; never in a prefork parent: CUDA does not survive the fork)."""
    pool = getattr(instance, "pool_cls", "")
    pool = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "thread" in str(pool):
        get_extractor()


# --------------------------------------------------------------------------- batching

CUDA_BATCH = 16  # DELF_WORKER_BATCH=0 (automatic) on a GPU
CPU_BATCH = 1    # ... and on a CPU: batching does not pay there (BENCHMARKS.md)


def worker_batch() -> int:
    """DELF_WORKER_BATCH, or its automatic value for DELF_DEVICE."""
    value = int(config.get("DELF_WORKER_BATCH"))
    if value > 0:
        return value
    device = str(config.get("DELF_DEVICE"))
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return CUDA_BATCH if device.startswith("cuda") else CPU_BATCH


def worker_threads(batch: int | None = None) -> int:
    """Tasks a worker runs at once: one batch in the network, the next being read and decoded."""
    return 2 * (batch or worker_batch())


try:
    from prometheus_client import Histogram

    BATCH_SIZES = Histogram("delf_extractor_batch_photos", "Photos per forward batch of the extractor",
                            buckets=(1, 2, 4, 8, 16, 32, 64))
except ImportError:  # pragma: no cover - metrics are optional
    BATCH_SIZES = None


class _Slot:
    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = False


class Batcher:
    """Runs ``run(list of RGB arrays) -> list of features`` on the photos handed in by many
    threads, up to ``max_batch`` at a time, on one thread of its own.

    A batch starts when it is full, when no announced photo is still being prepared
    (`slot`), or ``wait_s`` after its oldest photo arrived; urgent photos (searches) go
    first, in a batch of their own, at once. If a batch fails, its photos are run one by
    one, so an error belongs to the photo that caused it. ``sizes`` counts the batches
    run, by size.
    """

    def __init__(self, run, max_batch: int, wait_s: float, name: str = "delf-batcher", run_urgent=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._run = run
        self._run_urgent = run_urgent or run  # urgent photos (searches) may be run differently
        self.max_batch = max_batch
        self.wait_s = max(0.0, float(wait_s))
        self.name = name
        self.sizes: dict[int, int] = {}
        self._cond = threading.Condition()
        self._pending: list[tuple] = []
        self._urgent: list[tuple] = []
        self._preparing = 0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def slot(self):
        """Announce a photo being read and decoded: until it is submitted (``submit(...,
        slot=s)``) or the block ends, a partial batch may wait for it."""
        s = _Slot()
        with self._cond:
            self._preparing += 1
        try:
            yield s
        finally:
            if not s.used:
                with self._cond:
                    self._preparing -= 1
                    self._cond.notify_all()

    def submit(self, rgb, urgent: bool = False, slot: _Slot | None = None):
        """The features of one photo, once its batch has run (blocks the calling thread)."""
        future: Future = Future()
        with self._cond:
            if slot is not None and not slot.used:
                slot.used = True
                self._preparing -= 1
            (self._urgent if urgent else self._pending).append((rgb, future, time.monotonic()))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return future.result()

    def _next_batch(self) -> tuple[list[tuple], bool]:
        """The next batch, and whether it is urgent."""
        with self._cond:
            while True:
                if self._urgent:
                    batch, self._urgent = self._urgent[:self.max_batch], self._urgent[self.max_batch:]
                    return batch, True
                if self._pending:
                    waited = time.monotonic() - self._pending[0][2]
                    if len(self._pending) >= self.max_batch or self._preparing <= 0 or waited >= self.wait_s:
                        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                        return batch, False
                    self._cond.wait(self.wait_s - waited)
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while True:
            batch, urgent = self._next_batch()
            try:
                self.run_batch(batch, urgent)
            except BaseException:  # noqa: BLE001 - never leave a task waiting forever
                log.exception("extract batch failed")
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(RuntimeError("the extract batch failed"))

    def run_batch(self, batch: list[tuple], urgent: bool = False) -> None:
        run = self._run_urgent if urgent else self._run
        images = [item[0] for item in batch]
        n = len(images)
        sizes = len({im.shape[:2] for im in images})
        t = time.perf_counter()
        if n > 1:
            log.info("extract batch: %d photos (%d sizes) started", n, sizes)
        try:
            results = run(images)
            if len(results) != n:
                raise RuntimeError(f"the extractor returned {len(results)} results for {n} photos")
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if n == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("extract batch of %d photos failed (%s: %s); running them one by one",
                        n, type(exc).__name__, exc)
            for rgb, future, _ in batch:
                try:
                    future.set_result(run([rgb])[0])
                except Exception as one:  # noqa: BLE001 - this photo's own error
                    future.set_exception(one)
            return
        finally:
            self.sizes[n] = self.sizes.get(n, 0) + 1
            if BATCH_SIZES is not None:
                BATCH_SIZES.observe(n)
        if n > 1:
            log.info("extract batch: %d photos (%d sizes) done in %.2f s", n, sizes, time.perf_counter() - t)
        for (_, future, _), feats in zip(batch, results):
            future.set_result(feats)


_batcher: Batcher | None = None


def get_batcher() -> Batcher:
    """The worker process's batcher (DELF_WORKER_BATCH, DELF_WORKER_BATCH_WAIT_MS)."""
    global _batcher
    if _batcher is None:
        with _lock:
            if _batcher is None:
                query_scale = config.get("DELF_QUERY_MAX_SCALE") or None
                _batcher = Batcher(lambda images: get_extractor().extract_batch(images), worker_batch(),
                                   float(config.get("DELF_WORKER_BATCH_WAIT_MS")) / 1000.0,
                                   run_urgent=lambda images: get_extractor().extract_batch(
                                       images, max_scale=query_scale))
    return _batcher


app.conf.worker_concurrency = worker_threads()  # the --pool threads worker's threads


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


def read_url(url: str) -> bytes:
    """The bytes of an http(s) URL item, under delf_common.fetch's rules (DELF_URL_INGEST,
    DELF_URL_ALLOWED_HOSTS, no private addresses, DELF_MAX_IMAGE_BYTES, DELF_URL_TIMEOUT_S).
    Raises FetchError: ``transient`` ones are retried by the task."""
    return fetch.fetch_url(url)


def _item_bytes(item: dict) -> bytes:
    image, location = item.get("image"), item.get("location")
    if image and location:
        raise _refuse(INVALID_ARGUMENT, "give either the image bytes or a location, not both")
    if location:
        if isinstance(location, str) and fetch.is_url(location):
            return read_url(location)
        return read_location(location)
    if image is None:
        raise _refuse(INVALID_ARGUMENT, "the item has neither image bytes nor a location")
    if not isinstance(image, (bytes, bytearray)):
        raise _refuse(INVALID_ARGUMENT, f"image must be bytes, got {type(image).__name__}")
    return bytes(image)


# --------------------------------------------------------------------------- tasks


def _features_wire(rgb, urgent: bool = False, slot: _Slot | None = None) -> dict:
    t = time.perf_counter()
    feats = get_batcher().submit(rgb, urgent=urgent, slot=slot)
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
    return {"ok": True, "features": _features_wire(rgb, urgent=True)}


# The result goes to delf.ingest.index as the next step of the chain and is never read
# from the result backend: do not store it there (it holds a photo's features, and a
# Redis restart at that moment would fail the task after the work was done).
# URL items: transient fetch failures (connection errors, timeouts, HTTP 5xx/429) are retried
# with backoff (1, 2, 4, 8, 16 s, jitter; Retry-After honoured up to 30 s), then the item fails.
FETCH_MAX_RETRIES = 5


@app.task(name=INGEST_EXTRACT, ignore_result=True)
def ingest_extract(item: dict, job_id: str) -> dict:
    """One bulk-ingest item -> ``{"ok": True, "image_id", "metadata", "features"}`` for delf.ingest.index."""
    image_id = item.get("image_id")
    if _job_store().is_cancelled(job_id):  # skip the work; the index step records the item
        return {"ok": False, "image_id": image_id, "error": {"code": "CANCELLED", "message": "job cancelled"}}
    with get_batcher().slot() as slot:  # a partial batch may wait for this photo
        try:
            rgb = decode_image(_item_bytes(item))
        except ImageRejected as exc:
            log.info("job %s: item %s refused: %s", job_id, image_id, exc.message)
            return {"ok": False, "image_id": image_id, "error": exc.to_dict()}
        except fetch.FetchError as exc:
            return _fetch_failed(exc, image_id, job_id)
        return {"ok": True, "image_id": image_id, "metadata": dict(item.get("metadata") or {}),
                "features": _features_wire(rgb, slot=slot)}


def _fetch_failed(exc: fetch.FetchError, image_id, job_id: str) -> dict:
    """A URL item's fetch failed: retry the task (transient, tries left) or fail the item."""
    request = ingest_extract.request  # this delivery's context (no id when called directly)
    retries = request.retries or 0
    if exc.transient and request.id and retries < FETCH_MAX_RETRIES:
        delay = fetch.retry_delay(retries, exc.retry_after)
        log.warning("job %s: item %s: %s; retry %d in %.1f s", job_id, image_id, exc.message,
                    retries + 1, delay)
        raise ingest_extract.retry(countdown=delay, max_retries=FETCH_MAX_RETRIES) from None
    message = exc.message + (f" (after {retries + 1} tries)" if exc.transient else "")
    log.info("job %s: item %s refused: %s", job_id, image_id, message)
    return {"ok": False, "image_id": image_id, "error": {"code": exc.code, "message": message}}
