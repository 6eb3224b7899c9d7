"""The extractor's settings, read from the environment once.

A worker process reads them once (``delf_extractor.tasks.settings``: before its threads
start, for the malloc tuning and the pool size) and hands them to what needs them: the
batcher, the model (`DelfExtractor`), the ingest sources. Library code that builds a
model outside a worker (``delf fit-pca``, the evaluation tools, scripts) reads them when
it builds one, through `ExtractorSettings.from_env`.
"""
from __future__ import annotations

import dataclasses

from delf_common import config
from delf_common.fetch import FetchPolicy
from delf_common.images import ImageLimits


@dataclasses.dataclass(frozen=True)
class ExtractorSettings:
    model: str
    device: str
    weights_dir: str
    pca: str  # DELF_PCA: a path, a shipped artifact's name, or "" (the model's own)
    worker_batch: int  # 0: automatic
    worker_batch_wait_ms: float
    query_max_scale: float  # 0: every pyramid level
    dark_lightness: float  # DELF_DARK_LIGHTNESS: photos below it are lifted (photometric.py); 0: never
    malloc_tune: bool
    ingest_roots: tuple[str, ...]
    image_limits: ImageLimits  # every photo decoded (DELF_MAX_IMAGE_BYTES, _PIXELS, DELF_MIN_IMAGE_SIDE)
    fetch_policy: FetchPolicy  # URL items (DELF_URL_*)
    thumbnail_side: int  # DELF_THUMBNAIL_SIDE; 0: no thumbnails

    @classmethod
    def from_env(cls) -> "ExtractorSettings":
        return cls(
            model=config.get("DELF_MODEL"),
            device=str(config.get("DELF_DEVICE")),
            weights_dir=config.get("DELF_WEIGHTS_DIR"),
            pca=str(config.get("DELF_PCA") or "").strip(),
            worker_batch=int(config.get("DELF_WORKER_BATCH")),
            worker_batch_wait_ms=float(config.get("DELF_WORKER_BATCH_WAIT_MS")),
            query_max_scale=float(config.get("DELF_QUERY_MAX_SCALE")),
            dark_lightness=float(config.get("DELF_DARK_LIGHTNESS")),
            malloc_tune=bool(config.get("DELF_MALLOC_TUNE")),
            ingest_roots=tuple(config.get("DELF_INGEST_ROOTS")),
            image_limits=ImageLimits.from_env(),
            fetch_policy=FetchPolicy.from_env(),
            thumbnail_side=int(config.get("DELF_THUMBNAIL_SIDE")),
        )
