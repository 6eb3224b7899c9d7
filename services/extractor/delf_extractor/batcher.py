"""The extract worker's batcher: one thread that runs the network on the photos that many
task threads hand in.

Batching (DELF_WORKER_BATCH, DELF_WORKER_BATCH_WAIT_MS): the worker runs 2 x
DELF_WORKER_BATCH tasks at once (`worker_threads`), each an ordinary Celery task with its
own message, acknowledgement, retries and result. A task reads and decodes its photo in
its own thread, then hands the pixels to the process's `Batcher` (`get_batcher`), whose
single thread runs the network on up to DELF_WORKER_BATCH photos at a time
(`DelfExtractor.extract_batch`: photos of equal size share each forward pass) and gives
each task its own features. So one batch is in the network while the next is being read,
a worker killed mid-batch leaves every one of its messages unacknowledged (redelivered),
and a bad photo fails only its own task. Search-time photos (``urgent``) skip the wait:
they go into the next forward pass on their own.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

from delf_extractor.settings import ExtractorSettings

if TYPE_CHECKING:  # the extractor imports torch; this module does not
    from delf_extractor.extract import DelfExtractor

log = logging.getLogger(__name__)

CUDA_BATCH = 16  # DELF_WORKER_BATCH=0 (automatic) on a GPU
CPU_BATCH = 1    # ... and on a CPU: batching does not pay there (BENCHMARKS.md)


def worker_batch(settings: ExtractorSettings) -> int:
    """DELF_WORKER_BATCH, or its automatic value for DELF_DEVICE."""
    if settings.worker_batch > 0:
        return settings.worker_batch
    device = settings.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return CUDA_BATCH if device.startswith("cuda") else CPU_BATCH


def worker_threads(settings: ExtractorSettings) -> int:
    """Tasks a worker runs at once: one batch in the network, the next being read and decoded."""
    return 2 * worker_batch(settings)


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

    def warm_up(self, rgb) -> None:
        """Run the network once on `rgb` as a search would, outside the batch statistics
        (the worker's warm-up is no photo of a user's)."""
        self._run_urgent([rgb])

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
            except BaseException:  # never leave a task waiting forever
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
_lock = threading.Lock()


def get_batcher(extractor: Callable[[], DelfExtractor], settings: ExtractorSettings) -> Batcher:
    """The worker process's batcher (DELF_WORKER_BATCH, DELF_WORKER_BATCH_WAIT_MS), made with the
    `settings` of its first call.

    ``extractor()`` gives the process's `DelfExtractor`; it is called for every batch, so the
    batcher always runs the model the worker holds at that moment."""
    global _batcher
    if _batcher is None:
        with _lock:
            if _batcher is None:
                query_scale = settings.query_max_scale or None
                _batcher = Batcher(lambda images: extractor().extract_batch(images), worker_batch(settings),
                                   settings.worker_batch_wait_ms / 1000.0,
                                   run_urgent=lambda images: extractor().extract_batch(
                                       images, max_scale=query_scale))
    return _batcher
