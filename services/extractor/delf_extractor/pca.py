"""PCA of DELF descriptors: fit, versioned artifact, and the ``delf fit-pca`` command.

DELF reduces its L2-normalised local features with PCA and L2-normalises again
(no whitening, as the reference configuration). The projection is learned from
the descriptors the extractor itself selects (same pyramid, same top-k), since
those are the ones that will be reduced.

An artifact is an .npz with ``mean`` (D,), ``components`` (d, D), ``explained_variance``
(d,), ``model``, ``pca_id`` = ``{model}-pca{d}-{first 8 hex of sha256(mean, components)}``
and ``record`` (JSON: the command, photos and counts used to fit it). The pca_id
travels with every feature set, so an index can refuse descriptors of another projection.

The shipped artifacts (``weights/*-pca*.npz``; the default model's is
``effnet-lite0-cat32-pca96.npz``, ``effnet-lite0``'s ``effnet-lite0-pca40.npz``) were
produced like::

    python -c "import delf_extractor.pca as p; p.main(['--model', 'effnet-lite0', '--dim', '40'])"

i.e. ``delf fit-pca --model MODEL --dim D`` with no photos: scikit-image's
bundled sample photos (`SAMPLE_PHOTOS`) plus seeded random crops, scalings and
rotations of them (`sample_views`). The landmarks-dev photos are deliberately not
used: they are the evaluation set.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from delf_extractor import models

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}

# scikit-image sample photos that ship inside the package (no download needed).
SAMPLE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle",
                 "clock", "coins", "brick", "grass", "gravel")
VIEWS_PER_PHOTO = 8
SEED = 0


class PcaMismatch(ValueError):
    """A PCA artifact was fitted for another model than the one running."""


@dataclasses.dataclass
class Pca:
    mean: np.ndarray          # (D,) float32
    components: np.ndarray    # (d, D) float32, rows orthonormal
    explained_variance: np.ndarray  # (d,) float32
    model: str
    pca_id: str
    record: dict

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """L2-normalised projection of L2-normalised raw descriptors (N, D) -> (N, d)."""
        y = (np.asarray(x, np.float32) - self.mean) @ self.components.T
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

    def check_model(self, model: str) -> None:
        if self.model != model:
            raise PcaMismatch(
                f"PCA artifact {self.pca_id} was fitted for model {self.model!r}, but the extractor "
                f"runs {model!r}; fit one with `delf fit-pca --model {model}`")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path, mean=self.mean, components=self.components, explained_variance=self.explained_variance,
            model=np.array(self.model), pca_id=np.array(self.pca_id), record=np.array(json.dumps(self.record)))
        return path


def content_id(model: str, mean: np.ndarray, components: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(mean, "<f4").tobytes())
    h.update(np.ascontiguousarray(components, "<f4").tobytes())
    return f"{model}-pca{components.shape[0]}-{h.hexdigest()[:8]}"


def fit_pca(descriptors: np.ndarray, dim: int, model: str, record: dict | None = None) -> Pca:
    """PCA of (N, D) descriptors (L2-normalised raw features); sign of each component fixed
    (largest-magnitude coefficient positive) so that refits are reproducible."""
    x = np.asarray(descriptors, np.float64)
    if x.ndim != 2 or x.shape[0] <= dim or x.shape[1] < dim:
        raise ValueError(f"need more than {dim} descriptors of at least {dim} dims, got {x.shape}")
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:dim]
    comps = evecs[:, order].T
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])
    comps *= signs[:, None]
    mean32, comps32 = mean.astype(np.float32), comps.astype(np.float32)
    rec = dict(record or {})
    rec.update(num_descriptors=int(x.shape[0]), input_dim=int(x.shape[1]),
               explained_variance_ratio=float(evals[order].sum() / evals.sum()))
    return Pca(mean32, comps32, evals[order].astype(np.float32), model,
               content_id(model, mean32, comps32), rec)


def load_pca(path: str | Path) -> Pca:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PCA artifact {path} not found; create it with `delf fit-pca --out {path}`")
    with np.load(path, allow_pickle=False) as z:
        pca = Pca(z["mean"].astype(np.float32), z["components"].astype(np.float32),
                  z["explained_variance"].astype(np.float32), str(z["model"]), str(z["pca_id"]),
                  json.loads(str(z["record"])))
    expected = content_id(pca.model, pca.mean, pca.components)
    if pca.pca_id != expected:
        raise ValueError(f"PCA artifact {path}: pca_id {pca.pca_id} does not match its content ({expected})")
    return pca


def default_path(cfg: models.ModelConfig) -> Path:
    return models.WEIGHTS_DIR / cfg.pca_file


def configured_path(cfg: models.ModelConfig) -> Path:
    """The PCA artifact DELF_PCA names (a path, or a shipped artifact's name), else the
    model's shipped one."""
    from delf_common import config

    value = str(config.get("DELF_PCA") or "").strip()
    if not value:
        return default_path(cfg)
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = models.WEIGHTS_DIR / (value if value.endswith(".npz") else value + ".npz")
    if "/" not in value and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in models.WEIGHTS_DIR.glob("*pca*.npz"))
    raise FileNotFoundError(f"DELF_PCA={value!r}: no such file, nor a shipped PCA of that name "
                            f"(shipped: {', '.join(names)}); create one with `delf fit-pca --out PATH`")


# --------------------------------------------------------------------------- photos


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

    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            try:
                out.append((str(p.relative_to(folder)), decode_image(p.read_bytes())))
            except ImageRejected as exc:
                print(f"skipping {p}: {exc.message}", file=sys.stderr)
    return out


def raw_descriptors(extractor, photos: list[np.ndarray]) -> np.ndarray:
    """L2-normalised raw descriptors the extractor selects from the photos (extractor built with pca=None)."""
    assert extractor.pca is None
    return np.concatenate([extractor.extract(p).descriptors for p in photos])


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``delf fit-pca [--model M] [--out PATH] [--dim D] [PHOTOS_DIR]``."""
    from delf_extractor.extract import DelfExtractor

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
