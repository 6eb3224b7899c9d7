"""Training of DELF's attention head (backbone frozen) and fine-tuning of the backbone.

``delf train-attention`` (DELF-NOTES.md, "Training", stage 2): the backbone stays frozen;
the attention head scores every feature-map cell; a linear classifier sees the
attention-weighted mean of the L2-normalised features and learns the landmark
(group) of the photo. Only image-level labels are used. ``--target homography`` is a
label-free variant: the head learns to predict which cells re-match their own location
after a known homography (see `matchability_targets`).

``delf finetune`` (stage 1): cross-entropy fine-tuning of the backbone up to the
descriptor layer (plus a pooled linear classifier that is thrown away) on landmark
labels; it writes a backbone state dict that a preset loads with ``backbone_weights``.
Meant for a GPU; it runs (slowly, tiny) on a CPU.

Data. A manifest (``MANIFEST.tsv``: ``path`` and ``group`` columns, as for ``delf eval``).
With ``--split train`` (default) only the *training* groups are used: a group is a
training group when ``sha256("delf-attention-split:" + group)`` is even (`split_groups`);
``distractor_*`` groups are never used. On landmarks-dev this gives 18 training groups
(57 photos) and 17 held-out groups (57 photos, all of them queries), which
scripts/bench_attention.py queries with. Each photo (long side capped at 1024 px, as the
extractor's working image) is multiplied into views: random scale (the extractor's
pyramid range), random crop, rotation and perspective warp, brightness/contrast
(`random_view`). Views come in pairs sharing a centre point, so that the homography
between the two is known (used by the label-free target).

Efficiency on a CPU: the frozen backbone runs once per view; the feature maps are cached
(float16) and the head is trained for many epochs on the cache. Attention and classifier
see only cells that the extractor keeps (``border_px`` margin dropped).

Outputs: ``<model>-attention-<target>-<sha8>.pth`` (an `models.AttentionHead` state dict;
sha8 = first 8 hex of the sha256 of its tensors) plus a ``.json`` beside it recording the
command, photos, split, losses and the calibrated ``score_threshold`` (`calibrate_threshold`).
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
import torch
import torch.nn.functional as F
from torch import nn

from delf_extractor import models
from delf_tools.train_data import (SPLIT_SALT, VIEW_SIZE, Photo, TrainError, ViewCache, build_cache, cap_side,
                                   load_cache, load_manifest_photos, random_view, save_cache)
# Also reachable as `train.<name>` (tests and scripts/bench_attention.py use them).

TARGETS = ("classification", "homography")


# --------------------------------------------------------------------------- label-free target


def matchability_targets(cache: ViewCache, bank_size: int = 20000, seed: int = 0,
                         pca=None) -> torch.Tensor:
    """Per cell of every view: 1 if its descriptor re-matches its own location in the partner
    view, 0 if not, -1 (ignored) when the location falls outside the partner view or the border.

    Re-matching: the nearest neighbour (L2-normalised descriptor, PCA-reduced when ``pca``
    is given, as the index stores them) among the partner view's kept cells plus a bank of
    ``bank_size`` cells from views of *other groups* lies within one cell (stride px) of
    where the known homography puts the cell.
    """
    import cv2

    rng = np.random.default_rng(seed)
    n, c, fh, fw = cache.feats.shape
    mask = cache.mask.flatten()

    def desc(i: int) -> torch.Tensor:
        d = F.normalize(cache.feats[i].float().flatten(1).T, dim=1)
        if pca is not None:
            d = F.normalize((d - torch.from_numpy(pca.mean)) @ torch.from_numpy(pca.components).T, dim=1)
        return d

    yy, xx = np.meshgrid(cache.centres_y, cache.centres_x, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64)
    targets = torch.full((n, fh * fw), -1.0)
    all_desc = [desc(i) for i in range(n)]
    for i in range(n):
        j = int(cache.partner[i])
        # bank: random kept cells of views of other groups
        others = np.flatnonzero(cache.labels.numpy() != int(cache.labels[i]))
        pick_v = rng.choice(others, size=min(bank_size // 50 + 1, len(others)), replace=False)
        kept = np.flatnonzero(mask.numpy())
        bank = torch.cat([all_desc[v][rng.choice(kept, size=50, replace=False)] for v in pick_v])
        cand = torch.cat([all_desc[j][mask], bank])
        nn_idx = (all_desc[i] @ cand.T).argmax(1).numpy()
        H_ij = np.linalg.inv(cache.H[j]) @ cache.H[i]
        where = cv2.perspectiveTransform(pts.reshape(1, -1, 2), H_ij)[0]
        jpts = pts[mask.numpy()]
        inside = ((where[:, 0] >= cache.centres_x[0]) & (where[:, 0] <= cache.centres_x[-1])
                  & (where[:, 1] >= cache.centres_y[0]) & (where[:, 1] <= cache.centres_y[-1]))
        hit_partner = nn_idx < len(jpts)
        err = np.full(len(pts), np.inf)
        err[hit_partner] = np.linalg.norm(jpts[nn_idx[hit_partner]] - where[hit_partner], axis=1)
        t = (err <= cache.stride).astype(np.float32)
        valid = inside & mask.numpy()
        targets[i, valid] = torch.from_numpy(t[valid])
    return targets.view(n, fh, fw)


# --------------------------------------------------------------------------- training


class AttentionClassifier(nn.Module):
    """DELF's stage-2 model: attention-weighted mean of L2-normalised features -> linear classifier."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 512):
        super().__init__()
        self.attention = models.AttentionHead(channels, hidden)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(feats) * mask                      # (B, h, w)
        pooled = (F.normalize(feats, dim=1) * a[:, None]).sum((2, 3)) / mask.sum()
        # x10: the pooled vector is short (norm ~0.2 at the start); lets the classifier reach
        # confident logits in a few hundred steps.
        return self.fc(pooled * 10.0)


def attention_logits(head: models.AttentionHead, feats: torch.Tensor) -> torch.Tensor:
    """The head's output before softplus (softplus is monotonic: same ranking)."""
    return head.conv2(F.relu(head.conv1(feats))).squeeze(1)


def train_head(cache: ViewCache, target: str, epochs: int, seed: int, device: torch.device,
               lr: float = 1e-3, batch: int = 64, hidden: int = 512, log=print,
               targets: torch.Tensor | None = None) -> tuple[models.AttentionHead, list[float], dict]:
    """Train the attention head on the cached features; returns (head, mean loss per epoch, info)."""
    torch.manual_seed(seed)
    n, c = cache.feats.shape[:2]
    mask = cache.mask.to(device).float()
    info: dict = {}
    if target == "classification":
        model = AttentionClassifier(c, len(cache.groups), hidden).to(device)
        params = list(model.parameters())
        head = model.attention
    elif target == "homography":
        if targets is None:
            raise ValueError("homography target needs `targets` (matchability_targets)")
        head = models.AttentionHead(c, hidden).to(device)
        params = list(head.parameters())
        valid = targets >= 0
        info["positive_rate"] = float(targets[valid].mean())
        info["cells"] = int(valid.sum())
    else:
        raise ValueError(f"unknown target {target!r} ({', '.join(TARGETS)})")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    gen = torch.Generator().manual_seed(seed)
    losses, correct = [], 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total, count, correct = 0.0, 0, 0
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            x = cache.feats[idx].to(device).float()
            if target == "classification":
                y = cache.labels[idx].to(device)
                logits = model(x, mask)
                loss = F.cross_entropy(logits, y)
                correct += int((logits.argmax(1) == y).sum())
            else:
                t = targets[idx].to(device)
                ok = (t >= 0) & mask.bool()
                z = attention_logits(head, x)
                loss = F.binary_cross_entropy_with_logits(z[ok], t[ok])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        sched.step()
        losses.append(total / count)
        msg = f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}"
        if target == "classification":
            msg += f", train accuracy {correct / n:.3f}"
        log(msg)
    if target == "classification":
        info["train_accuracy"] = correct / n
    return head.cpu().eval(), losses, info


def tensor_sha(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


FILL_QUANTILE = 0.1  # calibration: 90 % of the training photos still fill the feature cap


def calibrate_threshold(cfg: models.ModelConfig, photos: list[Photo], device: str | None = None,
                        quantile: float = FILL_QUANTILE) -> tuple[float, dict]:
    """The attention threshold below which a feature is not worth keeping, calibrated on the
    training photos: the ``quantile`` of their ``max_features``-th best score, so that 90 %
    of them still keep ``max_features`` features and only photos with little high-attention
    content (blank walls, sky) keep fewer. Uses the full extraction pipeline (pyramid, border).

    A first rule (the threshold at which the photos keep 1000 features on average uncapped,
    i.e. most photos below the cap) lowered held-out mAP from 0.911 to 0.878 on landmarks-dev
    (BENCHMARKS.md "Trained attention"): the feature count matters more than the attention
    ranking's tail."""
    from delf_extractor.extract import DelfExtractor

    k = cfg.max_features
    full = dataclasses.replace(cfg, score_threshold=None, max_features=10 ** 9)
    ex = DelfExtractor(config=full, device=device, pca=None)
    kth = []
    for p in photos:
        s = np.sort(ex.extract(p.rgb).scores)[::-1]
        kth.append(float(s[k - 1]) if len(s) >= k else 0.0)
    thr = round(float(np.quantile(kth, quantile)), 4)
    return thr, {"rule": f"quantile {quantile} over the training photos of their {k}-th best score",
                 "photos": len(photos), "kth_best_score_median": round(float(np.median(kth)), 4),
                 "photos_below_cap": int(sum(v < thr for v in kth))}


def _record_base(prog: str, argv, manifest: Path, photos: list[Photo], args) -> dict:
    return {
        "command": f"{prog} " + " ".join(argv),
        "created": time.strftime("%Y-%m-%d"),
        "manifest": str(manifest),
        "split": {"rule": f"sha256('{SPLIT_SALT}' + group) even -> training group; distractor_* never",
                  "used": args.split,
                  "groups": sorted({p.group for p in photos})},
        "photos": [p.rel for p in photos],
        "seed": args.seed,
        "epochs": args.epochs,
    }


def _parent_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("manifest", help="MANIFEST.tsv: header row, tab-separated, 'path' (relative to its folder) "
                                    "and 'group' columns (e.g. ../shared/data/landmarks-dev/MANIFEST.tsv)")
    p.add_argument("--model", default="effnet-lite0", help="preset whose backbone is used (default effnet-lite0)")
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                   help="which groups to train on (default: train; see `delf_tools.train_data.split_groups`)")
    p.add_argument("--out", default=None, help="output file, or a folder for the content-named default "
                                               "(default: the current folder)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (default cpu; 'auto': CUDA when present)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N photos")
    p.add_argument("--views", type=int, default=None, help="random views per photo")
    p.add_argument("--lr", type=float, default=None)
    return p


def _out_path(out: str | None, name: str) -> Path:
    if out is None:
        return Path(name)
    p = Path(out)
    return p / name if p.is_dir() else p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _attention_parser() -> argparse.ArgumentParser:
    p = _parent_parser("delf train-attention", (
        "Train the attention head of a preset's frozen backbone with image-level labels (DELF stage 2: "
        "classifier on the attention-weighted sum of L2-normalised features), or label-free "
        "(--target homography: predict which cells re-match after a known homography). Writes "
        "<model>-attention-<target>-<sha8>.pth and a .json record with the calibrated score threshold."))
    p.add_argument("--target", default="classification", choices=TARGETS)
    p.add_argument("--backbone-weights", default=None, help="a fine-tuned backbone state dict (`delf finetune`)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the score-threshold calibration")
    p.add_argument("--cache", default=None, metavar="PATH",
                   help="reuse (or create) this file of the views' backbone features: a second run with "
                        "the same photos, views, seed and model (e.g. the other --target) skips the backbone")
    return p


def _train_attention(args, log=_log):
    """(preset, photos, device, head, losses, info, start time) of one `delf train-attention` run.
    TrainError, ValueError or FileNotFoundError on a problem the user must fix."""
    if args.epochs < 1 or args.views < 2:
        raise TrainError("--epochs must be >= 1 and --views >= 2")
    cfg = models.get_config(args.model)
    cfg = dataclasses.replace(cfg, score="norm", score_threshold=None, attention_weights=None,
                              backbone_weights=args.backbone_weights or cfg.backbone_weights)
    photos = load_manifest_photos(args.manifest, args.split, args.limit)
    device = models.resolve_device(args.device)
    t0 = time.perf_counter()
    net = models.build_model(cfg).to(device)
    log(f"{len(photos)} photos of {len({q.group for q in photos})} groups, {args.views} views each")
    key = {"photos": [q.rel for q in photos], "manifest": str(Path(args.manifest).resolve()),
           "views": args.views, "seed": args.seed, "model": cfg.name, "view_size": VIEW_SIZE,
           "backbone_weights": cfg.backbone_weights}
    cache = load_cache(Path(args.cache), key) if args.cache else None
    if cache is None:
        cache = build_cache(net, photos, args.views, args.seed, device, log)
        if args.cache:
            save_cache(cache, Path(args.cache), key)
    else:
        log(f"views: {len(cache.labels)} cached in {args.cache}")
    targets = None
    if args.target == "homography":
        from delf_extractor import pca as pca_mod

        pca = None
        try:
            pca = pca_mod.load_pca(pca_mod.default_path(cfg))
        except FileNotFoundError:
            pass
        targets = matchability_targets(cache, seed=args.seed, pca=pca)
    head, losses, info = train_head(cache, args.target, args.epochs, args.seed, device, lr=args.lr,
                                    hidden=cfg.attention_hidden, log=log, targets=targets)
    return cfg, photos, device, head, losses, info, t0


def main_attention(argv: list[str] | None = None) -> int:
    """``delf train-attention MANIFEST [--target classification|homography] ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _attention_parser()
    args = p.parse_args(argv)
    args.epochs = 15 if args.epochs is None else args.epochs
    args.views = 24 if args.views is None else args.views
    args.lr = 1e-3 if args.lr is None else args.lr
    try:
        cfg, photos, device, head, losses, info, t0 = _train_attention(args)
    except (TrainError, ValueError, FileNotFoundError) as exc:
        print(f"delf train-attention: {exc}", file=sys.stderr)
        return 2
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    sha = tensor_sha(state)
    out = _out_path(args.out, f"{cfg.name}-attention-{args.target}-{sha[:8]}.pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    record = _record_base(p.prog, argv, Path(args.manifest), photos, args)
    record.update(model=cfg.name, target=args.target, sha256=sha, views_per_photo=args.views,
                  view_size=VIEW_SIZE, lr=args.lr, backbone_weights=cfg.backbone_weights,
                  losses=[round(x, 5) for x in losses], train_s=round(time.perf_counter() - t0, 1), **info)
    if not args.no_calibrate:
        tmp_cfg = dataclasses.replace(cfg, score="attention", attention_weights=str(out.resolve()))
        thr, cal = calibrate_threshold(tmp_cfg, photos, device=str(device))
        record.update(score_threshold=thr, calibration=cal)
        _log(f"score threshold {thr} ({cal['photos_below_cap']} of {len(photos)} training photos keep fewer "
             f"than {cfg.max_features} features)")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{out} (sha256 {sha[:8]}): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


# --------------------------------------------------------------------------- finetune


class FinetuneNet(nn.Module):
    """Backbone up to the descriptor layer + GeM pooling + linear classifier (the head is discarded)."""

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x).clamp(min=1e-6)
        return self.fc(F.normalize(f.pow(3).mean((2, 3)).pow(1 / 3), dim=1) * 16.0)


def _finetune_parser() -> argparse.ArgumentParser:
    p = _parent_parser("delf finetune", (
        "Fine-tune a preset's backbone (up to its descriptor layer) with cross-entropy on the manifest's "
        "group labels (DELF stage 1; random crops of 250-px-rescaled views, as the paper's 224 crops). "
        "Meant for a GPU. Writes <model>-backbone-<sha8>.pth (load it with a preset's backbone_weights) "
        "and a .json record."))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224, help="training crop side (default 224)")
    return p


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One optimiser step on a batch: (its mean loss, its correct predictions)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), int((logits.argmax(1) == y).sum())


def _finetune(args, log=_log):
    """(preset, photos, trained model, loss per epoch, start time) of one `delf finetune` run.
    TrainError, ValueError or FileNotFoundError on a problem the user must fix."""
    if args.epochs < 1 or args.views < 1 or args.batch_size < 1 or args.image_size < 64:
        raise TrainError("--epochs, --views and --batch-size must be >= 1, --image-size >= 64")
    cfg = models.get_config(args.model)
    photos = load_manifest_photos(args.manifest, args.split, args.limit)
    device = models.resolve_device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = models.build_model(dataclasses.replace(cfg, score="norm", attention_weights=None))
    groups = sorted({q.group for q in photos})
    label_of = {g: i for i, g in enumerate(groups)}
    model = FinetuneNet(net.backbone, cfg.channels, len(groups)).to(device)
    mean, std = net.mean.to(device), net.std.to(device)
    # BatchNorm statistics stay frozen (batches of a few landmarks are too small to estimate them).
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": args.lr},
                             {"params": model.fc.parameters(), "lr": args.lr * 100}], weight_decay=1e-4)
    log(f"{len(photos)} photos of {len(groups)} groups on {device}")
    t0 = time.perf_counter()
    capped = [cap_side(q.rgb, 2 * args.image_size) for q in photos]
    losses = []
    for epoch in range(args.epochs):
        model.train()
        for m in bns:
            m.eval()
        items = [(i, k) for i in range(len(photos)) for k in range(args.views)]
        rng.shuffle(items)
        total, correct = 0.0, 0
        for s in range(0, len(items), args.batch_size):
            chunk = items[s:s + args.batch_size]
            views = np.stack([random_view(capped[i], rng, size=args.image_size, scales=(0.5, 1.0))[0]
                              for i, _ in chunk])
            y = torch.tensor([label_of[photos[i].group] for i, _ in chunk], device=device)
            x = (torch.from_numpy(views).to(device).permute(0, 3, 1, 2).float() - mean) / std
            loss, right = _step(model, opt, x, y)
            total += loss * len(chunk)
            correct += right
        losses.append(total / len(items))
        log(f"epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.4f}, train accuracy {correct / len(items):.3f}")
    return cfg, photos, model, losses, t0


def main_finetune(argv: list[str] | None = None) -> int:
    """``delf finetune MANIFEST [--epochs N] [--device cuda] ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _finetune_parser()
    args = p.parse_args(argv)
    args.epochs = 20 if args.epochs is None else args.epochs
    args.views = 8 if args.views is None else args.views
    args.lr = 1e-4 if args.lr is None else args.lr
    try:
        cfg, photos, model, losses, t0 = _finetune(args)
    except (TrainError, ValueError, FileNotFoundError) as exc:
        print(f"delf finetune: {exc}", file=sys.stderr)
        return 2
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    sha = tensor_sha({k: v.float() for k, v in state.items()})
    out = _out_path(args.out, f"{cfg.name}-backbone-{sha[:8]}.pth")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    record = _record_base(p.prog, argv, Path(args.manifest), photos, args)
    record.update(model=cfg.name, sha256=sha, views_per_photo=args.views, image_size=args.image_size,
                  batch_size=args.batch_size, lr=args.lr, losses=[round(x, 5) for x in losses],
                  train_s=round(time.perf_counter() - t0, 1),
                  use=f"dataclasses.replace(get_config({cfg.name!r}), backbone_weights={out.name!r}) "
                      f"with the file in DELF_WEIGHTS_DIR")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{out} (sha256 {sha[:8]}): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_attention())
