#!/usr/bin/env python
"""Issue 3's GPU benchmark in one run: how fast is extraction on one GPU?

For a preset (default `delf-resnet50`: ResNet50 to conv4, 7 scales 0.25-2.0) on 1024x768
JPEG photos:

1. straightforward: fp32, one image at a time, one pyramid level at a time (the reference
   code's way), JPEG decode included;
2. the model alone: batched bf16 + channels_last forward passes of every level, on uint8
   tensors already on the GPU (resizes included, no decode, no selection);
3. end to end: JPEG bytes in, PCA-reduced features out (`DelfExtractor.extract_batch`,
   bf16, decode of the next batch in threads while the GPU runs this one).

Targets (issue 3): (3) >= 3x (1) and >= 90% of (2). Also the equivalence of (3) with (1):
the share of (1)'s keypoints that (3) keeps at the same place and scale, and the cosine of
their descriptors (>= 95% and >= 0.99 asked). `--fast-scales` adds a capped-pyramid row.

Photos: `--photos DIR` (JPEGs, resized to 1024x768), else synthetic textured 1024x768
JPEGs (throughput does not depend on content). Weights: the preset's if found (see
docs/METHOD.md: ResNet50 ImageNet weights are a local file), else random (same speed). PCA: the
preset's artifact if any, else a random orthonormal projection to 40 dimensions (same cost).

Runs anywhere torch does; `--quick` is a small CPU smoke run (tests/test_extractor.py).

    python scripts/bench_gpu.py [--device cuda] [--model delf-resnet50] [--images 128] [--batch 16]
        [--fast-scales 0.25,0.3536,0.5,0.7071,1.0,1.4142] [--json OUT.json]

On the lent GPU machine (python3 with torch, torchvision and opencv; nothing to install,
imports come from the checkout), one call of about 5 minutes:

    python3 scripts/bench_gpu.py --images 256 --batch 32 \
        --fast-scales 0.25,0.3536,0.5,0.7071,1.0,1.4142 --json $OUT/gpu.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for sub in ("shared", "services/extractor"):  # runs from a bare checkout (the GPU machine)
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

from delf_extractor import models, pca as pca_mod  # noqa: E402 - after the sys.path / environment setup above
from delf_extractor.extract import DelfExtractor  # noqa: E402 - after the sys.path / environment setup above


def synthetic_jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    w, h = size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = cv2.resize(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8), (w, h),
                         interpolation=cv2.INTER_CUBIC)
        for _ in range(40):
            c = tuple(int(v) for v in rng.integers(0, 255, 3))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.rectangle(img, (x, y), (x + int(rng.integers(10, 200)), y + int(rng.integers(10, 200))), c, -1)
            cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, 80)), c, 3)
        img = cv2.add(img, rng.integers(0, 30, img.shape, dtype=np.uint8))
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def folder_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
    out = []
    for p in paths:
        img = cv2.resize(cv2.imread(str(p)), size, interpolation=cv2.INTER_AREA)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    while out and len(out) < n:
        out.extend(out[: n - len(out)])
    return out


def decode(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[..., ::-1])


def random_pca(cfg: models.ModelConfig, dim: int = 40) -> pca_mod.Pca:
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((cfg.channels, dim)))
    return pca_mod.Pca(mean=np.zeros(cfg.channels, np.float32), components=q.T.astype(np.float32),
                       explained_variance=np.ones(dim, np.float32), model=cfg.pca_model or cfg.name,
                       pca_id=f"random-{cfg.name}-{dim}", record={})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def straightforward(ex: DelfExtractor, jpegs: list[bytes]) -> float:
    sync(ex.device)
    t = time.perf_counter()
    for data in jpegs:
        ex.extract(decode(data))
    sync(ex.device)
    return len(jpegs) / (time.perf_counter() - t)


@torch.inference_mode()
def model_alone(ex: DelfExtractor, jpegs: list[bytes], batch: int) -> float:
    imgs = [decode(d) for d in jpegs]
    h, w = imgs[0].shape[:2]
    gpu = [torch.from_numpy(np.stack(imgs[i:i + batch])).to(ex.device) for i in range(0, len(imgs), batch)]
    levels = ex._levels(h, w)

    def run(x_u8):
        x = x_u8.permute(0, 3, 1, 2).float()
        for _, lh, lw in levels:
            level = x if (lh, lw) == (h, w) else F.interpolate(
                x, size=(lh, lw), mode="bilinear", align_corners=False, antialias=True)
            if ex.fast:
                level = level.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    ex.net(level)
            else:
                ex.net(level)

    run(gpu[0])  # warm-up (cudnn autotune)
    sync(ex.device)
    t = time.perf_counter()
    for x in gpu:
        run(x)
    sync(ex.device)
    return len(imgs) / (time.perf_counter() - t)


def end_to_end(ex: DelfExtractor, jpegs: list[bytes], batch: int, workers: int = 8) -> tuple[float, list]:
    chunks = [jpegs[i:i + batch] for i in range(0, len(jpegs), batch)]
    feats = []
    with cf.ThreadPoolExecutor(workers) as pool:
        ex.extract_batch([decode(d) for d in chunks[0]])  # warm-up
        sync(ex.device)
        t = time.perf_counter()
        pending = list(pool.map(decode, chunks[0]))
        for i in range(len(chunks)):
            nxt = [pool.submit(decode, d) for d in chunks[i + 1]] if i + 1 < len(chunks) else []
            feats.extend(ex.extract_batch(pending))
            pending = [f.result() for f in nxt]
        sync(ex.device)
        rate = len(jpegs) / (time.perf_counter() - t)
    return rate, feats


def equivalence(ref, fast) -> tuple[float, float]:
    """Share of the reference's keypoints kept by the fast path at the same place and scale,
    and the median cosine of their descriptors."""
    kept, cos = [], []
    for a, b in zip(ref, fast):
        key_b = {(round(float(x), 1), round(float(y), 1), round(float(s), 3)): i
                 for i, ((x, y), s) in enumerate(zip(b.locations, b.scales))}
        hits = [(i, key_b[k]) for i, ((x, y), s) in enumerate(zip(a.locations, a.scales))
                if (k := (round(float(x), 1), round(float(y), 1), round(float(s), 3))) in key_b]
        kept.append(len(hits) / max(len(a), 1))
        if hits:
            ia, ib = np.array(hits).T
            cos.extend((a.descriptors[ia] * b.descriptors[ib]).sum(1).tolist())
    return float(np.mean(kept)), float(np.median(cos)) if cos else float("nan")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="delf-resnet50")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--straightforward-images", type=int, default=32, help="images for path (1)")
    p.add_argument("--photos", type=Path)
    p.add_argument("--size", default="1024x768")
    p.add_argument("--fast-scales", default="", help="also a preset with these scales, comma-separated")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 4 small images")
    args = p.parse_args()
    if args.quick:
        args.images, args.batch, args.straightforward_images, args.size = 4, 2, 2, "256x192"
    return args


def weights_and_pca(cfg: models.ModelConfig) -> tuple[bool, pca_mod.Pca]:
    """(whether pretrained weights are here, the shipped PCA or a random one): the speed is
    the same either way."""
    try:
        models.build_model(cfg, pretrained=True)
        pretrained = True
    except (FileNotFoundError, OSError, ValueError, ImportError) as exc:
        print(f"({cfg.name}: no weights here, random weights, same speed: {str(exc).splitlines()[0]})")
        pretrained = False
    try:
        pca = pca_mod.load_pca(pca_mod.default_path(cfg))
    except (FileNotFoundError, OSError, ValueError):
        pca = random_pca(cfg)
    return pretrained, pca


def main() -> None:
    args = parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    device = torch.device(args.device)
    jpegs = folder_jpegs(args.photos, args.images, size) if args.photos else synthetic_jpegs(args.images, size)
    cfg = models.get_config(args.model)
    pretrained, pca = weights_and_pca(cfg)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{gpu_name}, torch {torch.__version__}, {cfg.name}, scales {cfg.scales}, {size[0]}x{size[1]} JPEG, "
          f"batch {args.batch}, PCA {pca.pca_id}")

    results = {}
    ref = DelfExtractor(config=cfg, device=str(device), pca=pca, pretrained=pretrained, fast=False)
    fast = DelfExtractor(config=cfg, device=str(device), pca=pca, pretrained=pretrained)
    fast.net.load_state_dict(ref.net.state_dict())  # same (possibly random) weights
    straightforward(ref, jpegs[:1])  # warm-up
    results["1 straightforward fp32, 1 image x 1 level"] = straightforward(ref, jpegs[: args.straightforward_images])
    results["2 model alone, batched bf16, tensors on device"] = model_alone(fast, jpegs, args.batch)
    e2e, fast_feats = end_to_end(fast, jpegs, args.batch)
    results["3 end to end, JPEG bytes -> PCA features"] = e2e
    if args.fast_scales:
        capped = dataclasses.replace(cfg, scales=tuple(float(s) for s in args.fast_scales.split(",")))
        quick = DelfExtractor(config=capped, device=str(device), pca=pca, pretrained=pretrained)
        quick.net.load_state_dict(fast.net.state_dict())
        results[f"3' end to end, scales {args.fast_scales}"] = end_to_end(quick, jpegs, args.batch)[0]
    n_eq = min(8, len(jpegs))
    ref_feats = [ref.extract(decode(d)) for d in jpegs[:n_eq]]
    kept, cosine = equivalence(ref_feats, fast_feats[:n_eq])

    base, alone = results["1 straightforward fp32, 1 image x 1 level"], results["2 model alone, batched bf16, tensors on device"]
    print("| path | images/s | vs (1) | vs (2) |")
    print("|---|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {rate / alone:.0%} |")
    print(f"equivalence (3) vs (1) on {n_eq} images: {kept:.1%} of keypoints at the same place and scale, "
          f"median descriptor cosine {cosine:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"device": gpu_name, "torch": torch.__version__, "model": cfg.name,
                                         "batch": args.batch, "images_per_s": results,
                                         "keypoints_kept": kept, "cosine_median": cosine}, indent=2))


if __name__ == "__main__":
    main()
