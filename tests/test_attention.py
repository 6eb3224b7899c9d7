"""Attention training (`delf train-attention`), backbone fine-tuning (`delf finetune`) and the
shipped trained attention: real backbone, real photos (scikit-image samples; landmarks-dev
tests skip when it is absent)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from delf_tools import cli
from delf_extractor import models
from delf_tools import train, train_data
from delf_extractor.extract import DelfExtractor
from photos import jpeg, landmarks_dir, sample_photo

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory) -> Path:
    """Four real photos, each its own group, as a manifest (every photo in its own folder)."""
    folder = tmp_path_factory.mktemp("samples")
    lines = ["path\tgroup"]
    for name in SAMPLES:
        (folder / name).mkdir()
        (folder / name / "a.jpg").write_bytes(jpeg(sample_photo(name)))
        lines.append(f"{name}/a.jpg\t{name}")
    (folder / "MANIFEST.tsv").write_text("\n".join(lines) + "\n")
    return folder / "MANIFEST.tsv"


def _record(pth: Path) -> dict:
    return json.loads(pth.with_suffix(".json").read_text())


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_and_never_trains_on_distractors():
    groups = [f"g{i}" for i in range(40)] + ["distractor_a", "distractor_b"]
    train_groups, held = train_data.split_groups(groups)
    assert train_data.split_groups(reversed(groups)) == (train_groups, held)
    assert not set(train_groups) & set(held)
    assert set(train_groups) | set(held) == {f"g{i}" for i in range(40)}
    assert 10 <= len(train_groups) <= 30  # about half


def test_landmarks_split_has_held_out_queries():
    folder = landmarks_dir()
    if folder is None:
        pytest.skip("landmarks-dev not found (set DELF_LANDMARKS_DIR)")
    rows = (folder / "MANIFEST.tsv").read_text().splitlines()[1:]
    groups = [r.split("\t")[1] for r in rows if r.strip()]
    train_groups, held = train_data.split_groups(groups)
    # Documented in train.py / docs/METHOD.md / BENCHMARKS: 18 training groups, 17 held-out groups of 57 photos.
    assert (len(train_groups), len(held)) == (18, 17)
    assert sum(g in held for g in groups) == 57


# --------------------------------------------------------------------------- train-attention


@pytest.mark.parametrize("target", ["classification", "homography"])
def test_train_attention_writes_a_head_a_preset_can_use(sample_manifest, tmp_path, target, capsys):
    out = tmp_path / "heads"
    out.mkdir()
    # calibration (full-pyramid extraction of the photos) is exercised with one target only
    rc = cli.main(["train-attention", str(sample_manifest), "--split", "all", "--target", target,
                   "--views", "2" if target == "classification" else "4", "--epochs", "12", "--lr", "3e-3",
                   "--out", str(out), "--seed", "1", "--cache", str(tmp_path / "views.pt")]
                  + (["--no-calibrate"] if target == "homography" else []))
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "views.pt").is_file()  # the backbone features of the views, for a rerun
    (pth,) = out.glob(f"effnet-lite0-attention-{target}-*.pth")
    rec = _record(pth)
    # identified by content: the name carries the sha256 of the tensors
    state = torch.load(pth, map_location="cpu", weights_only=True)
    assert pth.stem.endswith(rec["sha256"][:8]) and train.tensor_sha(state) == rec["sha256"]
    assert rec["losses"][-1] < rec["losses"][0], rec["losses"]
    assert rec["photos"] == [f"{n}/a.jpg" for n in SAMPLES] and rec["target"] == target
    assert rec["command"].startswith(f"delf train-attention {sample_manifest} --split all --target {target}")
    if target == "homography":
        assert 0.02 < rec["positive_rate"] < 0.98  # both re-matching and failing cells exist
    thr = rec.get("score_threshold", 1.0)
    assert thr > 0
    cfg = dataclasses.replace(models.get_config("effnet-lite0"), name="effnet-lite0", score="attention",
                              attention_weights=str(pth), score_threshold=thr)
    ex = DelfExtractor(config=cfg, device="cpu")
    f = ex.extract(sample_photo("coffee"))
    assert 0 < len(f.scores) <= cfg.max_features and (f.scores >= thr).all()
    assert f.descriptors.shape[1] == cfg.pca_dim


def test_homography_targets_mark_cells_that_rematch(sample_manifest):
    photos = train.load_manifest_photos(sample_manifest, "all")[:2]
    net = models.build_model("effnet-lite0")
    cache = train.build_cache(net, photos, 4, seed=0, device=torch.device("cpu"), log=lambda m: None)
    t = train.matchability_targets(cache, bank_size=500, seed=0)
    assert t.shape == cache.feats.shape[:1] + cache.feats.shape[2:]
    valid = t >= 0
    # border cells and cells warped out of the partner view are ignored; inside, a real share re-matches
    assert not valid[:, ~cache.mask].any() and valid.float().mean() > 0.2
    assert 0.05 < float(t[valid].mean()) < 0.95


# --------------------------------------------------------------------------- shipped weights


def test_shipped_attention_loads_and_selects_other_keypoints_than_the_norm():
    cfg = models.get_config("effnet-lite0-attn")
    assert cfg.score == "attention" and cfg.score_threshold is not None
    path = models.find_weights(cfg.attention_weights)
    rec = _record(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert train.tensor_sha(state) == rec["sha256"] and path.stem.endswith(rec["sha256"][:8])
    assert rec["score_threshold"] == cfg.score_threshold
    # no photo of a held-out group was used to train it
    assert all(train_data.is_training_group(g) for g in rec["split"]["groups"])
    rgb = sample_photo("astronaut")
    att = DelfExtractor("effnet-lite0-attn", device="cpu").extract(rgb)
    norm = DelfExtractor("effnet-lite0", device="cpu").extract(rgb)
    a = {tuple(np.round(p, 1)) for p in att.locations}
    b = {tuple(np.round(p, 1)) for p in norm.locations}
    assert len(att.scores) > 100
    assert len(a & b) < 0.8 * min(len(a), len(b))  # a different selection, not a reordering
    assert (att.scores >= cfg.score_threshold).all()


# --------------------------------------------------------------------------- finetune


def test_finetune_tiny_cpu_run_writes_a_loadable_backbone(sample_manifest, tmp_path, monkeypatch, capsys):
    rc = cli.main(["finetune", str(sample_manifest), "--split", "all", "--epochs", "2", "--views", "1",
                   "--image-size", "96", "--batch-size", "4", "--lr", "1e-3", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    (pth,) = tmp_path.glob("effnet-lite0-backbone-*.pth")
    rec = _record(pth)
    assert len(rec["losses"]) == 2 and rec["photos"] == [f"{n}/a.jpg" for n in SAMPLES]
    monkeypatch.setenv("DELF_WEIGHTS_DIR", str(tmp_path))
    cfg = dataclasses.replace(models.get_config("effnet-lite0"), backbone_weights=pth.name)
    tuned = models.build_model(cfg)
    imagenet = models.build_model("effnet-lite0")
    saved = torch.load(pth, map_location="cpu", weights_only=True)
    for k, v in tuned.backbone.state_dict().items():
        assert torch.equal(v, saved[k])
    key = "net._blocks.10._project_conv.weight"
    assert not torch.equal(tuned.backbone.state_dict()[key], imagenet.backbone.state_dict()[key])
    f = DelfExtractor(config=cfg, device="cpu").extract(sample_photo("rocket"))
    assert len(f.scores) > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["train-attention", "finetune"])
def test_bad_manifests_give_a_clear_error(command, tmp_path, capsys):
    assert cli.main([command, str(tmp_path / "nope.tsv")]) == 2
    assert "no manifest at" in capsys.readouterr().err
    bad = tmp_path / "MANIFEST.tsv"
    bad.write_text("path\tlabel\na.jpg\tx\n")
    assert cli.main([command, str(bad)]) == 2
    assert "'group'" in capsys.readouterr().err
    one = tmp_path / "one.tsv"
    (tmp_path / "a.jpg").write_bytes(jpeg(sample_photo("coffee")))
    one.write_text("path\tgroup\na.jpg\tonly\n")
    assert cli.main([command, str(one), "--split", "all"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert cli.main([command, str(one), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
