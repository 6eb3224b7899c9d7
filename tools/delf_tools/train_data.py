"""The training data of `delf train-attention` and `delf finetune`: the deterministic
split of a manifest's groups, its decoded photos, random views (in pairs whose
homography is known) and the cache of their frozen-backbone features (see `train`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from delf_extractor import models

SPLIT_SALT = "delf-attention-split:"
VIEW_SIZE = 320           # training view side, pixels (20 x 20 feature cells)
WORK_SIDE = 1024          # photos are capped to this long side first (the extractor's working image)


class TrainError(Exception):
    """A problem the user must fix (bad manifest, too few photos); the message says what."""


# --------------------------------------------------------------------------- data


def is_training_group(group: str) -> bool:
    """The deterministic split: training group iff sha256(salt + group) is even; never distractors."""
    if group.startswith("distractor_"):
        return False
    return int(hashlib.sha256((SPLIT_SALT + group).encode()).hexdigest(), 16) % 2 == 0


def split_groups(groups) -> tuple[list[str], list[str]]:
    """(training groups, held-out groups) among ``groups``, sorted; distractors in neither."""
    uniq = sorted(set(groups))
    train = [g for g in uniq if is_training_group(g)]
    held = [g for g in uniq if not g.startswith("distractor_") and g not in train]
    return train, held


@dataclasses.dataclass
class Photo:
    rel: str
    group: str
    rgb: np.ndarray


def load_manifest_photos(manifest: str | Path, split: str = "train", limit: int | None = None) -> list[Photo]:
    """Decoded photos of a manifest: ``split`` "train" (training groups), "heldout" or "all"
    (non-distractor groups). TrainError on a missing or malformed manifest."""
    from delf_tools.evaluation import read_manifest
    from delf_common.images import ImageLimits, ImageRejected, decode_image

    manifest = Path(manifest)
    if not manifest.is_file():
        raise TrainError(f"no manifest at {manifest} (a tab-separated file with a header row and "
                         f"'path' and 'group' columns)")
    try:
        rows = read_manifest(manifest)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    except (IndexError, UnicodeDecodeError) as exc:
        raise TrainError(f"{manifest}: not a readable tab-separated manifest ({exc})") from None
    train, held = split_groups(g for _, g in rows)
    keep = {"train": set(train), "heldout": set(held), "all": set(train) | set(held)}.get(split)
    if keep is None:
        raise TrainError(f"unknown split {split!r} (train, heldout, all)")
    photos, limits = [], ImageLimits.from_env()
    for rel, group in rows:
        if group not in keep:
            continue
        path = manifest.parent / rel
        if not path.is_file():
            raise TrainError(f"{manifest}: photo {rel} not found below {manifest.parent}")
        try:
            photos.append(Photo(rel, group, decode_image(path.read_bytes(), limits)))
        except ImageRejected as exc:
            raise TrainError(f"{path}: {exc.message}") from None
        if limit and len(photos) >= limit:
            break
    if len({p.group for p in photos}) < 2:
        raise TrainError(f"{manifest}: need photos of at least 2 {split} groups, found "
                         f"{len({p.group for p in photos})} (split rule: sha256('{SPLIT_SALT}' + group) even "
                         f"= train; distractor_* never)")
    return photos


def cap_side(rgb: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    if max(h, w) <= side:
        return rgb
    f = side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def random_view(rgb: np.ndarray, rng: np.random.Generator, size: int = VIEW_SIZE,
                centre: tuple[float, float] | None = None, scales=(0.35, 1.4142)) -> tuple[np.ndarray, np.ndarray]:
    """A size x size view of ``rgb``: random scale (log-uniform in ``scales``, not below what
    keeps 3/4 of the view inside the photo), crop around ``centre`` (photo pixels; random if
    None), rotation +-15 degrees, corner jitter up to 8 % (perspective), brightness/contrast.

    Returns (view RGB uint8, H) where H (3x3) maps view pixels to ``rgb`` pixels.
    """
    import cv2

    h, w = rgb.shape[:2]
    lo = max(scales[0], 0.75 * size / min(h, w))
    hi = max(lo, scales[1])
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    scaled = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    if centre is None:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    else:
        cx, cy = centre
    cx, cy = cx * sw / w, cy * sh / h
    half = size / 2
    cx = float(np.clip(cx + rng.uniform(-0.1, 0.1) * size, min(half, sw / 2), max(sw - half, sw / 2)))
    cy = float(np.clip(cy + rng.uniform(-0.1, 0.1) * size, min(half, sh / 2), max(sh - half, sh / 2)))
    angle = math.radians(rng.uniform(-15, 15))
    c, sn = math.cos(angle), math.sin(angle)
    square = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
    quad = []
    for x, y in square - half:
        x, y = x + rng.uniform(-0.08, 0.08) * size, y + rng.uniform(-0.08, 0.08) * size
        quad.append([cx + c * x - sn * y, cy + sn * x + c * y])
    H_view_scaled = cv2.getPerspectiveTransform(square, np.float32(quad))
    view = cv2.warpPerspective(scaled, H_view_scaled, (size, size),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    gain, bias = rng.uniform(0.7, 1.3), rng.uniform(-25, 25)
    view = np.clip(view.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    H = np.diag([w / sw, h / sh, 1.0]) @ H_view_scaled
    return np.ascontiguousarray(view), H


@dataclasses.dataclass
class ViewCache:
    """Frozen-backbone features of all views: feats (N, C, h, w) float16, labels (N,),
    photo index (N,), H (N, 3, 3) view -> photo pixels, pair partner index (N,)."""

    feats: torch.Tensor
    labels: torch.Tensor
    photo: np.ndarray
    H: np.ndarray
    partner: np.ndarray
    groups: list[str]
    centres_y: np.ndarray
    centres_x: np.ndarray
    stride: int
    mask: torch.Tensor       # (h, w) bool: cells the extractor would keep (border dropped)


def backbone_features(net: models.DelfNet, views: np.ndarray, device: torch.device, batch: int = 16) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for s in range(0, len(views), batch):
            x = torch.from_numpy(views[s:s + batch]).to(device).permute(0, 3, 1, 2).float()
            x = (x - net.mean) / net.std
            out.append(net.backbone(x).to(torch.float16).cpu())
    return torch.cat(out)


def build_cache(net: models.DelfNet, photos: list[Photo], views_per_photo: int, seed: int,
                device: torch.device, log=print) -> ViewCache:
    """Random view pairs of every photo through the frozen backbone (`random_view`)."""
    rng = np.random.default_rng(seed)
    groups = sorted({p.group for p in photos})
    label_of = {g: i for i, g in enumerate(groups)}
    pairs = max(1, views_per_photo // 2)
    feats, labels, owner, Hs, partner = [], [], [], [], []
    t0 = time.perf_counter()
    for pi, p in enumerate(photos):
        rgb = cap_side(p.rgb)
        h, w = rgb.shape[:2]
        views = []
        for _ in range(pairs):
            centre = (rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h)
            for _ in range(2):
                v, H = random_view(rgb, rng, centre=centre)
                views.append(v)
                Hs.append(H)
        base = len(labels)
        for k in range(len(views)):
            partner.append(base + (k ^ 1))
            labels.append(label_of[p.group])
            owner.append(pi)
        feats.append(backbone_features(net, np.stack(views), device))
        if (pi + 1) % 10 == 0 or pi + 1 == len(photos):
            log(f"views: {pi + 1}/{len(photos)} photos, {time.perf_counter() - t0:.0f} s")
    feats_t = torch.cat(feats)
    gy, gx = net.geometry(VIEW_SIZE, VIEW_SIZE)
    fh, fw = feats_t.shape[-2:]
    cy, cx = gy.centre(np.arange(fh)), gx.centre(np.arange(fw))
    m = net.cfg.border_px
    mask = torch.from_numpy(((cy >= m) & (cy <= VIEW_SIZE - 1 - m))[:, None] & ((cx >= m) & (cx <= VIEW_SIZE - 1 - m))[None, :])
    return ViewCache(feats_t, torch.tensor(labels), np.array(owner), np.stack(Hs), np.array(partner),
                     groups, cy, cx, gy.stride, mask)


def save_cache(cache: ViewCache, path: Path, key: dict) -> None:
    """The view cache as a torch file of tensors, strings and numbers (loads with weights_only)."""
    torch.save({"key": json.dumps(key, sort_keys=True), "feats": cache.feats, "labels": cache.labels,
                "photo": torch.from_numpy(cache.photo), "H": torch.from_numpy(cache.H),
                "partner": torch.from_numpy(cache.partner), "groups": list(cache.groups),
                "centres_y": torch.from_numpy(np.asarray(cache.centres_y, np.float64)),
                "centres_x": torch.from_numpy(np.asarray(cache.centres_x, np.float64)),
                "stride": int(cache.stride), "mask": cache.mask}, path)


def load_cache(path: Path, key: dict) -> ViewCache | None:
    """The cache at ``path`` if it was built with the same ``key`` (photos, views, seed, model), else None."""
    if not path.is_file():
        return None
    z = torch.load(path, map_location="cpu", weights_only=True)
    if z.get("key") != json.dumps(key, sort_keys=True):
        return None
    return ViewCache(z["feats"], z["labels"], z["photo"].numpy(), z["H"].numpy(), z["partner"].numpy(),
                     list(z["groups"]), z["centres_y"].numpy(), z["centres_x"].numpy(), int(z["stride"]), z["mask"])


