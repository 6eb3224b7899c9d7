"""The ``delf fit-pca`` command: fit the descriptor PCA on photos run through the extractor.

Without a photo folder it uses scikit-image's bundled sample photos (`SAMPLE_PHOTOS`) plus
seeded random crops, scalings and rotations of them (`sample_views`); the shipped
artifacts were made that way, e.g.::

    python -m delf_extractor.fit_pca --model effnet-lite0 --dim 40

The landmarks-dev photos are deliberately not used: they are the evaluation set. The
artifact itself (format, pca_id, loading) is `delf_extractor.pca`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from delf_extractor import models
from delf_extractor.extract import DelfExtractor
from delf_extractor.pca import default_path, fit_pca

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}

# scikit-image sample photos that ship inside the package (no download needed).
SAMPLE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle",
                 "clock", "coins", "brick", "grass", "gravel")
VIEWS_PER_PHOTO = 8
SEED = 0


def sample_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled sample photos as RGB uint8."""
    from skimage import data

    out = []
    for name in SAMPLE_PHOTOS:
        img = getattr(data, name)()
        if name == "stereo_motorcycle":
            out += [("stereo_motorcycle_left", img[0]), ("stereo_motorcycle_right", img[1])]
            continue
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append((name, np.ascontiguousarray(img[:, :, :3], np.uint8)))
    return out


def sample_views(rgb: np.ndarray, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """The photo itself plus ``count - 1`` random crops (50-100 % of each side), rescalings
    (0.6-2x) and rotations (+-20 degrees), so that a dozen photos give enough varied descriptors."""
    import cv2

    views = [rgb]
    h, w = rgb.shape[:2]
    for _ in range(count - 1):
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = rgb[y0:y0 + ch, x0:x0 + cw]
        s = rng.uniform(0.6, 2.0)
        crop = cv2.resize(crop, (max(32, round(cw * s)), max(32, round(ch * s))),
                          interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        angle = rng.uniform(-20, 20)
        m = cv2.getRotationMatrix2D((crop.shape[1] / 2, crop.shape[0] / 2), angle, 1.0)
        crop = cv2.warpAffine(crop, m, (crop.shape[1], crop.shape[0]), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT)
        views.append(np.ascontiguousarray(crop))
    return views


def folder_photos(folder: Path) -> list[tuple[str, np.ndarray]]:
    from delf_common.images import ImageRejected, decode_image
    from delf_extractor.settings import ExtractorSettings

    limits = ExtractorSettings.from_env().image_limits
    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            try:
                out.append((str(p.relative_to(folder)), decode_image(p.read_bytes(), limits)))
            except ImageRejected as exc:
                print(f"skipping {p}: {exc.message}", file=sys.stderr)
    return out


def raw_descriptors(extractor, photos: list[np.ndarray]) -> np.ndarray:
    """L2-normalised raw descriptors the extractor selects from the photos (extractor built with pca=None)."""
    assert extractor.pca is None
    return np.concatenate([extractor.extract(p).descriptors for p in photos])


def main(argv: list[str] | None = None) -> int:
    """``delf fit-pca [--model M] [--out PATH] [--dim D] [PHOTOS_DIR]``."""
    parser = argparse.ArgumentParser(prog="delf fit-pca", description=(
        "Fit the PCA that reduces the extractor's descriptors and save it as a versioned .npz. "
        "Without PHOTOS_DIR it uses scikit-image's sample photos plus random crops/scales/rotations."))
    parser.add_argument("photos", nargs="?", help="folder of photos (searched recursively); default: skimage samples")
    parser.add_argument("--model", default=None, help="model configuration (default: DELF_MODEL)")
    parser.add_argument("--dim", type=int, default=None, help="output dimension (default: the model's pca_dim)")
    parser.add_argument("--out", default=None, help="output .npz (default: the model's shipped artifact path)")
    parser.add_argument("--device", default=None, help="torch device (default: DELF_DEVICE)")
    args = parser.parse_args(argv)

    cfg = models.get_config(args.model)
    dim = args.dim or cfg.pca_dim
    out = Path(args.out) if args.out else default_path(cfg)
    command = "delf fit-pca " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.photos:
        folder = Path(args.photos)
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder")
        named = folder_photos(folder)
        if not named:
            parser.error(f"no photos found under {folder}")
        photos = [img for _, img in named]
        source = {"photos_dir": str(folder.resolve()), "photos": [n for n, _ in named]}
    else:
        rng = np.random.default_rng(SEED)
        named = sample_photos()
        photos = [v for _, img in named for v in sample_views(img, rng, VIEWS_PER_PHOTO)]
        source = {"photos": "skimage.data " + ",".join(n for n, _ in named),
                  "views_per_photo": VIEWS_PER_PHOTO, "seed": SEED}

    t0 = time.perf_counter()
    extractor = DelfExtractor(cfg.name, device=args.device, pca=None)
    desc = raw_descriptors(extractor, photos)
    record = {"command": command, "num_photos": len(photos), "created": time.strftime("%Y-%m-%d"),
              "extractor": {"scales": list(cfg.scales), "max_image_side": cfg.max_image_side,
                            "max_features": cfg.max_features, "border_px": cfg.border_px}, **source}
    pca = fit_pca(desc, dim, cfg.pca_model or cfg.name, record)  # presets sharing a PCA share its model name
    pca.save(out)
    print(f"{pca.pca_id}: {len(desc)} descriptors from {len(photos)} photos, "
          f"{pca.record['explained_variance_ratio']:.1%} variance kept, "
          f"{time.perf_counter() - t0:.0f} s -> {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
