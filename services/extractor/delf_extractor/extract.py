"""DELF local feature extraction: image pyramid -> dense features -> keypoint selection -> PCA.

Pipeline for one photo (the method and its deviations from the paper: docs/METHOD.md):

0. A dark photo (median lightness below DELF_DARK_LIGHTNESS) is brightened and locally
   equalised first (``photometric.lift_dark``); any other photo is used as it is.
1. If the config has ``max_image_side``, the photo is downscaled so its longer side
   fits (never upscaled); this is the *working* image.
2. For every pyramid scale s the working image is resized (bilinear, antialiased)
   and run through the network; a level whose smaller side is under 4 feature
   strides is skipped (the network's theoretical receptive field, 267-339 px, is
   larger than a whole 0.25 level of a 1024 px photo, which DELF nevertheless
   keeps, so it is no useful cut-off).
3. Every feature-map cell is a candidate keypoint at its receptive-field centre
   ``stride * i - padding + (rf - 1) / 2`` (geometry walked from the network for
   that level's size, `DelfNet.geometry`), mapped back to the submitted photo's
   pixels with the pixel-centre convention of the resize:
   ``x = (x_level + 0.5) * W / w_level - 0.5`` (i.e. divided by the scale).
4. Cells whose centre lies within ``border_px`` of the working image's border are
   dropped (zero-padding artefacts make them unreliable; they cost mAP), the
   threshold on the score applies, and the ``max_features`` best-scoring cells over
   all levels are kept.
5. Descriptors: L2-normalise, PCA, L2-normalise.

``DelfFeatures.scales`` holds 1 / (the level's scale relative to the submitted
photo), so ``rf * scales`` is a feature's receptive field in the photo's own
pixels, consistent with the locations; without a ``max_image_side`` downscale it
equals DELF's 1 / pyramid scale.

The presets' pyramids and image sizes were chosen by scripts/bench_extractor.py on
landmarks-dev; the settings tried and their time and mAP are in BENCHMARKS.md
("Extractor on CPU").
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from delf_common.features import DelfFeatures
from delf_extractor import models, pca as pca_mod, photometric
from delf_extractor.memory import tune_malloc
from delf_extractor.settings import ExtractorSettings

log = logging.getLogger(__name__)


# A pyramid level must give at least this many feature cells along its smaller side.
MIN_LEVEL_CELLS = 4

_DEFAULT = "default"


class DelfExtractor:
    """Extracts DELF features with one model configuration.

    model_name: a key of `models.MODEL_CONFIGS` (default: DELF_MODEL).
    device: "auto", "cpu", "cuda", "cuda:1" (default: DELF_DEVICE).
    pca: "default" (DELF_PCA, else the config's shipped artifact), a path to an artifact, a loaded
        `pca.Pca`, or None for raw (L2-normalised, not reduced) descriptors.
    config: overrides the preset (e.g. ``dataclasses.replace(cfg, scales=...)``).
    fast: on CUDA, bf16 autocast and channels_last (the default); False gives the plain
        fp32 path (the equivalence reference of scripts/bench_gpu.py).
    settings: the extractor's settings (default: read from the environment now).
    """

    def __init__(self, model_name: str | None = None, device: str | None = None,
                 pca=_DEFAULT, config: models.ModelConfig | None = None, pretrained: bool = True,
                 fast: bool = True, settings: ExtractorSettings | None = None):
        settings = settings or ExtractorSettings.from_env()  # read once, as the extractor is built
        self.cfg = config or models.get_config(model_name or settings.model)
        self.device = models.resolve_device(device or settings.device)
        net = models.build_model(self.cfg, pretrained=pretrained)
        models.fold_batchnorm(net)  # extraction only; training builds its own network
        self.net = net.to(self.device)
        if self.device.type == "cpu":
            tune_malloc(settings.malloc_tune)
        self.dark_lightness = settings.dark_lightness  # photos below it are lifted (photometric.py)
        self.cuda = self.device.type == "cuda"
        self.fast = self.cuda and fast  # bf16 autocast + channels_last
        if self.fast:
            self.net = self.net.to(memory_format=torch.channels_last)
        if isinstance(pca, str) and pca == _DEFAULT:
            pca = pca_mod.configured_path(self.cfg, settings.pca)  # DELF_PCA, else the shipped one
        if isinstance(pca, (str, Path)):
            pca = pca_mod.load_pca(pca)
        if pca is not None:
            pca.check_model(self.cfg.pca_model or self.cfg.name)
            if pca.input_dim != self.cfg.channels:
                raise ValueError(f"PCA {pca.pca_id} expects {pca.input_dim}-dim features; "
                                 f"{self.cfg.name} gives {self.cfg.channels}")
        self.pca = pca
        self._pca_mean = self._pca_w = None
        self._smallest: dict | None = None  # smallest_side() by max_scale, computed on first use
        # Kept feature cells (device indices, host keypoints) by level and photo size; bounded.
        self._cells: dict[tuple, tuple[torch.Tensor | None, np.ndarray]] = {}
        if pca is not None:
            self._pca_mean = torch.from_numpy(pca.mean).to(self.device)
            self._pca_w = torch.from_numpy(pca.components).to(self.device)

    @property
    def model_name(self) -> str:
        return self.cfg.name

    @property
    def pca_id(self) -> str:
        return self.pca.pca_id if self.pca is not None else ""

    @property
    def dim(self) -> int:
        return self.pca.dim if self.pca is not None else self.cfg.channels

    def smallest_side(self, max_scale: float | None = None) -> int:
        """The smallest side, in working-image pixels (after the ``max_image_side``
        downscale), that gives any pyramid level: a photo below it yields no features."""
        if self._smallest is None:
            self._smallest = {}
        if max_scale not in self._smallest:
            self._smallest[max_scale] = next(
                (side for side in range(1, 4096) if self._levels(side, side, max_scale)), 4096)
        return self._smallest[max_scale]

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the working image the pyramid is built from."""
        base = min(1.0, self.cfg.max_image_side / max(width, height)) if self.cfg.max_image_side else 1.0
        return max(1, round(width * base)), max(1, round(height * base))

    def extract(self, rgb: np.ndarray, max_scale: float | None = None) -> DelfFeatures:
        return self.extract_batch([rgb], max_scale=max_scale)[0]

    @torch.inference_mode()
    def extract_batch(self, images: list[np.ndarray], max_scale: float | None = None) -> list[DelfFeatures]:
        """Features of each photo; photos of equal size share each level's forward pass.

        max_scale: leave out pyramid levels above this scale (None: the preset's levels).
        Search queries may use it (DELF_QUERY_MAX_SCALE): the 1.41 level is most of the work,
        and a query matches the indexed photos about as well without it, with coarser region
        corners (BENCHMARKS.md, "Query-side pyramid levels")."""
        for rgb in images:
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {rgb.dtype} {rgb.shape}")
        images = [photometric.lift_dark(rgb, self.dark_lightness) for rgb in images]
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, rgb in enumerate(images):
            by_size[rgb.shape[:2]].append(i)
        out: list[DelfFeatures | None] = [None] * len(images)
        for (h, w), idx in by_size.items():
            batch = self._upload([images[i] for i in idx])
            for i, feats in zip(idx, self._extract_same_size(batch, h, w, max_scale)):
                out[i] = feats
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _upload(self, same_size: list[np.ndarray]) -> torch.Tensor:
        """The photos as one uint8 (n, H, W, 3) tensor on the device. On a GPU they are stacked
        straight into page-locked memory (reused by torch's host allocator) so the copy runs
        at full bus speed and without blocking the host."""
        if not self.cuda:
            return torch.from_numpy(np.stack(same_size))
        staging = torch.empty((len(same_size), *same_size[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(same_size, out=staging.numpy())
        return staging.to(self.device, non_blocking=True)

    def _levels(self, h: int, w: int, max_scale: float | None = None) -> list[tuple[float, int, int]]:
        """(scale relative to the photo, level height, level width) of each pyramid level."""
        base = 1.0
        if self.cfg.max_image_side:
            base = min(1.0, self.cfg.max_image_side / max(h, w))
        levels = []
        scales = self.cfg.scales
        if max_scale is not None:
            scales = tuple(s for s in scales if s <= max_scale + 1e-6) or scales[:1]
        for s in scales:
            lh, lw = max(1, round(h * base * s)), max(1, round(w * base * s))
            stride = self.net.geometry(lh, lw)[0].stride
            if min(lh, lw) >= MIN_LEVEL_CELLS * stride:
                levels.append((base * s, lh, lw))
        return levels

    def _extract_same_size(self, batch_u8: torch.Tensor, h: int, w: int,
                           max_scale: float | None = None) -> list[DelfFeatures]:
        cfg = self.cfg
        n = batch_u8.shape[0]
        x = batch_u8.permute(0, 3, 1, 2).float()
        base = min(1.0, cfg.max_image_side / max(h, w)) if cfg.max_image_side else 1.0
        # Border margin in working-image pixels, at most 1/8 of a side so small photos keep features.
        work_h, work_w = h * base, w * base
        margin_y = min(cfg.border_px, work_h / 8)
        margin_x = min(cfg.border_px, work_w / 8)

        if base < 1.0:  # one antialiased downscale to the working size; levels resize from it
            x = F.interpolate(x, size=(max(1, round(h * base)), max(1, round(w * base))),
                              mode="bilinear", align_corners=False, antialias=True)

        parts: list[tuple] = []  # per level: (locations, scores (n, cells), descriptors (n, cells, C), scale)
        for scale, lh, lw in self._levels(h, w, max_scale):
            level = x if (lh, lw) == tuple(x.shape[-2:]) else F.interpolate(
                x, size=(lh, lw), mode="bilinear", align_corners=False, antialias=True)
            level = level.clamp_(0, 255)
            if self.fast:
                level = level.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    feats, scores = self.net(level)
            else:
                feats, scores = self.net(level)
            # Selected on the device by an index computed on the host: no device sync per level.
            key = (tuple(scores.shape[-2:]), lh, lw, h, w)
            if key not in self._cells:
                if len(self._cells) > 1024:
                    self._cells.clear()
                idx, loc = self._kept_cells(key[0], (lh, lw), (h, w), base, (margin_y, margin_x))
                self._cells[key] = (None if idx is None else idx.to(self.device), loc)
            idx, loc = self._cells[key]
            if idx is None:
                continue
            desc = feats.flatten(2).index_select(2, idx).transpose(1, 2).float()  # (n, cells, C)
            sc = scores.flatten(1).index_select(1, idx).float()
            parts.append((loc, sc, desc, 1.0 / scale))
        return self._select(parts, n, (w, h))

    def _kept_cells(self, cells: tuple[int, int], level: tuple[int, int], photo: tuple[int, int],
                    base: float, margin: tuple[float, float]) -> tuple[torch.Tensor | None, np.ndarray]:
        """(flat indices of the feature cells outside the border margin, their keypoints in
        submitted-photo pixels as (x, y)), from the receptive-field geometry alone, on the host."""
        (fh, fw), (lh, lw), (h, w) = cells, level, photo
        gy, gx = self.net.geometry(lh, lw)
        # level pixels -> submitted-photo pixels (pixel-centre convention of the resize)
        py = (gy.centre(np.arange(fh, dtype=np.float32)) + 0.5) * (h / lh) - 0.5
        px = (gx.centre(np.arange(fw, dtype=np.float32)) + 0.5) * (w / lw) - 0.5
        keep_y = (py * base >= margin[0]) & (py * base <= h * base - 1 - margin[0])
        keep_x = (px * base >= margin[1]) & (px * base <= w * base - 1 - margin[1])
        keep = (keep_y[:, None] & keep_x[None, :]).ravel()
        if not keep.any():
            return None, np.zeros((0, 2), np.float32)
        yy, xx = np.meshgrid(py, px, indexing="ij")
        loc = np.stack([xx.ravel(), yy.ravel()], 1)[keep].astype(np.float32)
        return torch.from_numpy(np.flatnonzero(keep)), loc

    def _select(self, parts: list[tuple], n: int, size: tuple[int, int]) -> list[DelfFeatures]:
        """The best-scored features of each of the batch's n photos, from every level at once:
        one top-k, one PCA product and one copy to the host for the whole batch."""
        cfg = self.cfg
        if not parts:
            return [self._empty(size) for _ in range(n)]
        loc = np.concatenate([p[0] for p in parts])  # (cells, 2) on the host, shared by the batch
        scl = np.concatenate([np.full(len(p[0]), p[3], np.float32) for p in parts])
        sc = torch.cat([p[1] for p in parts], dim=1)  # (n, cells)
        desc = torch.cat([p[2] for p in parts], dim=1)  # (n, cells, C)
        if cfg.score_threshold is not None:
            sc = sc.masked_fill(sc < cfg.score_threshold, float("-inf"))
        vals, top = torch.topk(sc, min(cfg.max_features, sc.shape[1]), dim=1)  # sorted, best first
        kept = torch.isfinite(vals).sum(1)
        desc = F.normalize(torch.gather(desc, 1, top[..., None].expand(-1, -1, desc.shape[2])), dim=2)
        if self.pca is not None:
            desc = F.normalize((desc - self._pca_mean) @ self._pca_w.T, dim=2)
        top, vals, desc, kept = (t.cpu().numpy() for t in (top, vals, desc, kept))
        return [self._features(loc[top[b, :k]], scl[top[b, :k]], vals[b, :k], desc[b, :k], size)
                for b, k in enumerate(kept)]

    def _features(self, loc, scl, sc, desc, size: tuple[int, int]) -> DelfFeatures:
        if len(sc) == 0:
            return self._empty(size)
        return DelfFeatures(locations=loc, scales=scl, scores=sc, descriptors=desc, image_size=size,
                            model=self.cfg.name, pca_id=self.pca_id)

    def _empty(self, size: tuple[int, int]) -> DelfFeatures:
        return DelfFeatures(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros((0, self.dim)),
                            size, model=self.cfg.name, pca_id=self.pca_id)
