"""Shared by the extractor tests (test_extractor, test_extractor_network, test_extractor_pca,
test_extractor_tasks): the test Redis database and a queue prefix of their own, set
before delf_extractor's Celery app is imported (import this module first), photos of
landmarks-dev (the tests skip when it is absent) and PNG bytes.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from conftest import redis_db_url

os.environ.setdefault("DELF_REDIS_URL", redis_db_url(11))
os.environ.setdefault("DELF_QUEUE_PREFIX", f"test-extractor-{uuid.uuid4().hex[:8]}")

import numpy as np
import pytest
from PIL import Image


def landmarks_dir() -> Path:
    env = os.environ.get("DELF_LANDMARKS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/landmarks-dev"


def landmark_photo(index: int = 0) -> np.ndarray:
    folder = landmarks_dir()
    manifest = folder / "MANIFEST.tsv"
    if not manifest.is_file():
        pytest.skip(f"landmarks-dev not found at {folder} (set DELF_LANDMARKS_DIR)")
    rows = [line.split("\t") for line in manifest.read_text().splitlines()[1:] if line.strip()]
    with Image.open(folder / rows[index][0]) as im:
        return np.asarray(im.convert("RGB"))


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
