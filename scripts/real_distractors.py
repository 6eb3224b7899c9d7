"""Real distractor photos for ``bench_scale.py --real-distractors``: every landmarks-hard photo
and some of scikit-image's sample photos, with their DELF features (the shipped extractor,
cached), to fill an index beside landmarks-dev."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import bench_latency

REPO = Path(__file__).resolve().parents[1]
HARD_PHOTOS = REPO.parent / "shared" / "data" / "landmarks-hard"
SKIMAGE_PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "motorcycle", "hubble", "cat", "camera")
# A group of landmarks-hard that shows a landmarks-dev group's place (counted as that group).
SAME_PLACE_GROUPS = {"berlin_gendarmenmarkt_dome_night": "berlin_gendarmenmarkt_dome"}  # hard -> dev
SAME_PLACE = {f"hard:{h}": d for h, d in SAME_PLACE_GROUPS.items()}  # this module's ids


def real_distractors(cache: Path) -> dict:
    """{id: (group, "", DelfFeatures)} of real photos outside landmarks-dev: every
    landmarks-hard photo (ids and groups prefixed ``hard:``) and scikit-image's sample
    photos (``skimage:NAME``, a group each), extracted once by the shipped extractor and
    cached. Empty where landmarks-hard is absent."""
    from delf_common.features import DelfFeatures

    out = {}
    if (HARD_PHOTOS / "MANIFEST.tsv").is_file():
        for i, (g, rel, f) in bench_latency.real_features(HARD_PHOTOS, cache / "landmarks-hard").items():
            out[f"hard:{i}"] = (f"hard:{g}", rel, f)
    path = cache / "skimage.npz"
    if not path.exists():
        import skimage.data as data

        from delf_extractor.extract import DelfExtractor

        ex = DelfExtractor()
        photos = {n: (data.stereo_motorcycle()[0] if n == "motorcycle" else data.hubble_deep_field()
                      if n == "hubble" else getattr(data, n)()) for n in SKIMAGE_PHOTOS}
        feats = {n: ex.extract(np.stack([rgb] * 3, -1) if rgb.ndim == 2 else rgb[..., :3]) for n, rgb in photos.items()}
        np.savez(path, **{f"{n}/{k}": getattr(f, k) for n, f in feats.items()
                          for k in ("locations", "scales", "scores", "descriptors")},
                 **{f"{n}/size": np.array(f.image_size) for n, f in feats.items()})
    z = np.load(path)
    for n in SKIMAGE_PHOTOS:
        f = DelfFeatures(z[f"{n}/locations"], z[f"{n}/scales"], z[f"{n}/scores"], z[f"{n}/descriptors"],
                         tuple(int(v) for v in z[f"{n}/size"]), model="bench", pca_id=bench_latency.PCA_ID)
        out[f"skimage:{n}"] = (f"skimage:{n}", "", f)
    return out
