#!/usr/bin/env python
"""What the thumbnail per indexed photo costs (issue 15, item 2): bytes and ingest time.

* **Making it** (the extractor, `delf_common.images.thumbnail_jpeg` on the decoded photo):
  JPEG bytes and milliseconds per photo, for each longer side in ``--sides``
  (DELF_THUMBNAIL_SIDE; the shipped default is 320).
* **Storing it** (the indexer, one photo at a time as an ingest job does, on a fresh
  Milvus Lite file): the thumbnail's write (``ThumbnailStore.write``, what ``add`` does
  besides) beside the rest of ``add`` (500 descriptors of 96 dimensions and the images
  row), milliseconds and bytes on disk per photo, at the default side.
* **For scale**: the extractor's time per photo on this machine (``--extract N`` photos,
  0 to skip), which the extra time is to be compared with.

Photos: the landmarks-dev photos (../shared/data/landmarks-dev) when present, else
scikit-image's samples. Prints a table; ``--json PATH`` also writes the figures.

    .venv/bin/python scripts/bench_thumbnails.py [--sides 160,320,512] [--extract 4] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from photos import SAMPLE_PHOTOS, jpeg, landmarks_dir, sample_photo  # noqa: E402 - after the sys.path / environment setup above


def load_photos() -> tuple[str, list[np.ndarray]]:
    """(where from, decoded RGB photos) as the extractor holds them."""
    from delf_common.images import ImageLimits, decode_image

    root = landmarks_dir()
    if root is not None:
        lines = (root / "MANIFEST.tsv").read_text().splitlines()[1:]
        paths = [root / line.split("\t")[0] for line in lines if line.strip()]
        return f"landmarks-dev ({len(paths)} photos)", [decode_image(p.read_bytes(), ImageLimits.from_env()) for p in paths]
    photos = [sample_photo(n) for n in SAMPLE_PHOTOS]
    photos = [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
    return f"scikit-image samples ({len(photos)} photos)", [decode_image(jpeg(p[..., :3]), ImageLimits.from_env()) for p in photos]


def making(photos: list[np.ndarray], sides: list[int]) -> list[dict]:
    from delf_common.images import thumbnail_jpeg

    out = []
    for side in sides:
        sizes, times = [], []
        for rgb in photos:
            t = time.perf_counter()
            sizes.append(len(thumbnail_jpeg(rgb, side)))
            times.append(time.perf_counter() - t)
        out.append({"side": side, "bytes_mean": float(np.mean(sizes)), "bytes_median": float(np.median(sizes)),
                    "bytes_max": int(np.max(sizes)), "ms_mean": 1000 * float(np.mean(times))})
    return out


def _features(rng, n: int = 500, dim: int = 96):
    from delf_common.features import DelfFeatures

    d = rng.standard_normal((n, dim)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return DelfFeatures(rng.uniform(0, 1000, (n, 2)), rng.uniform(0.25, 1.4, n), rng.random(n), d,
                        (1024, 683), "bench", "bench-pca")


def _disk_bytes(folder: Path, part: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and part in str(p))


def storing(photos: list[np.ndarray], side: int, repeat: int) -> dict:
    """Every photo (``repeat`` times over, new ids) into a fresh Lite store: its descriptors
    and images row (``add``, as without thumbnails), then its thumbnail (what ``add`` does
    besides, ``ThumbnailStore.write``), each timed; bytes on disk per photo of the
    thumbnails collection and of the rest."""
    from delf_common.images import thumbnail_jpeg
    from delf_indexer.store import DescriptorStore

    thumbs = [thumbnail_jpeg(rgb, side) for rgb in photos]
    folder = Path(tempfile.mkdtemp(prefix="bench-thumbnails-"))
    rng = np.random.default_rng(0)
    try:
        store = DescriptorStore(str(folder / "milvus.db"), collection="bench")
        add_s, write_s = [], []
        for r in range(repeat):
            for k, thumb in enumerate(thumbs):
                image_id, feats = f"p{r}-{k}", _features(rng)
                t = time.perf_counter()
                store.add(image_id, feats)
                add_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                store.thumbnails.write({image_id: thumb})
                write_s.append(time.perf_counter() - t)
        store.close()
        n = len(add_s)
        thumbnails = _disk_bytes(folder, "_thumbnails")
        return {"photos": n, "add_ms": 1000 * float(np.mean(add_s)),
                "thumbnail_write_ms": 1000 * float(np.mean(write_s)),
                "thumbnail_disk_bytes_per_photo": thumbnails / n,
                "other_disk_bytes_per_photo": (_disk_bytes(folder) - thumbnails) / n}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def extraction_s(photos: list[np.ndarray], n: int) -> float | None:
    if n <= 0:
        return None
    from delf_extractor.extract import DelfExtractor

    ex = DelfExtractor()
    ex.extract(photos[0])  # warm-up
    t = time.perf_counter()
    for rgb in photos[1:n + 1]:
        ex.extract(rgb)
    return (time.perf_counter() - t) / len(photos[1:n + 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="160,320,512", help="thumbnail longer sides to measure")
    p.add_argument("--repeat", type=int, default=1,
                   help="times each photo is stored (new ids; identical thumbnails compress on disk: 1 for bytes)")
    p.add_argument("--extract", type=int, default=4, help="photos the extractor runs on, for scale (0: skip)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    os.environ.setdefault("DELF_DEVICE", "cpu")
    from delf_common import config

    source, photos = load_photos()
    default = config.SETTINGS["DELF_THUMBNAIL_SIDE"].default
    made = making(photos, [int(s) for s in args.sides.split(",")])
    stored = storing(photos, default, args.repeat)
    extract = extraction_s(photos, args.extract)
    print(f"photos: {source}; store: Milvus Lite, 500 descriptors x 96-d per photo; thumbnails at {default} px\n")
    print(f"{'side':>5} {'bytes mean':>11} {'median':>8} {'max':>7} {'ms to make':>11}")
    for r in made:
        print(f"{r['side']:>5} {r['bytes_mean']:>11,.0f} {r['bytes_median']:>8,.0f} {r['bytes_max']:>7,} "
              f"{r['ms_mean']:>11.1f}")
    print(f"\nstored ({stored['photos']} photos): descriptors + images row {stored['add_ms']:.1f} ms and "
          f"{stored['other_disk_bytes_per_photo']:,.0f} bytes per photo; thumbnail "
          f"{stored['thumbnail_write_ms']:.1f} ms and {stored['thumbnail_disk_bytes_per_photo']:,.0f} bytes per photo")
    make_ms = {r["side"]: r["ms_mean"] for r in made}
    extra_ms = None
    if default in make_ms:
        extra_ms = make_ms[default] + stored["thumbnail_write_ms"]
        print(f"extra ingest time per photo at {default} px: {extra_ms:.1f} ms (made + stored)")
    if extract is not None:
        print(f"extraction for scale: {extract:.2f} s per photo (CPU, DELF_MODEL's default)")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "default_side": default, "making": made,
                                               "storing": stored, "extraction_s": extract,
                                               "extra_ms_per_photo": extra_ms}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
