"""Extractor service: the PCA that reduces descriptors. The shipped artifacts match
their models, a PCA for another model is refused, DELF_PCA chooses the reduction, and
fit-pca recovers a subspace (in code and from the command line on a folder).
"""
from __future__ import annotations

from extractor_fixtures import landmark_photo, png_bytes  # first: sets the test Redis

import cv2
import numpy as np
import pytest
from skimage import data

from delf_extractor import fit_pca, models, pca as pca_mod
from delf_extractor.extract import DelfExtractor


@pytest.fixture(scope="module")
def half_photo() -> np.ndarray:
    rgb = landmark_photo(0)
    return cv2.resize(rgb, (512, round(512 * rgb.shape[0] / rgb.shape[1])), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("model", ["effnet-lite0", "effnet-lite0-cat32"])
def test_shipped_pca_artifact_matches_model(model):
    cfg = models.get_config(model)
    p = pca_mod.load_pca(pca_mod.default_path(cfg))
    assert p.model == model and p.dim == cfg.pca_dim and p.input_dim == cfg.channels
    assert p.pca_id == pca_mod.content_id(p.model, p.mean, p.components)
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(p.dim), atol=1e-4)
    assert np.all(np.diff(p.explained_variance) <= 0)
    assert "fit-pca" in p.record["command"] and p.record["num_descriptors"] > 10 * cfg.channels
    assert pca_mod.default_path(cfg).stat().st_size < 150_000  # small enough to ship in git


def test_pca_for_another_model_is_refused(tmp_path):
    p = pca_mod.load_pca(pca_mod.default_path(models.get_config("effnet-lite0")))
    other = pca_mod.Pca(p.mean, p.components, p.explained_variance, "delf-resnet50",
                        pca_mod.content_id("delf-resnet50", p.mean, p.components), {})
    path = other.save(tmp_path / "other.npz")
    with pytest.raises(pca_mod.PcaMismatch, match="delf-resnet50.*effnet-lite0"):
        DelfExtractor("effnet-lite0", device="cpu", pca=path)


def test_delf_pca_chooses_the_reduction(tmp_path, monkeypatch, half_photo):
    """DELF_PCA: a shipped artifact by name (the 64-d one), a file by path, or a clear error."""
    monkeypatch.setenv("DELF_PCA", "effnet-lite0-pca64")
    ex = DelfExtractor("effnet-lite0", device="cpu")
    assert ex.dim == 64 and ex.pca_id.startswith("effnet-lite0-pca64-")
    f = ex.extract(half_photo)
    assert f.descriptors.shape[1] == 64 and f.pca_id == ex.pca_id
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    p64 = pca_mod.load_pca(pca_mod.configured_path(models.get_config("effnet-lite0")))
    assert p64.record["num_descriptors"] > 10 * p64.input_dim and "--dim 64" in p64.record["command"]

    own = pca_mod.Pca(p64.mean, p64.components[:16], p64.explained_variance[:16], "effnet-lite0",
                      pca_mod.content_id("effnet-lite0", p64.mean, p64.components[:16]), {})
    monkeypatch.setenv("DELF_PCA", str(own.save(tmp_path / "mine.npz")))
    assert DelfExtractor("effnet-lite0", device="cpu").pca_id == own.pca_id

    monkeypatch.setenv("DELF_PCA", "no-such-pca")
    with pytest.raises(FileNotFoundError, match="no-such-pca.*effnet-lite0-pca40, effnet-lite0-pca64"):
        DelfExtractor("effnet-lite0", device="cpu")
    monkeypatch.setenv("DELF_PCA", "")
    assert DelfExtractor("effnet-lite0", device="cpu").dim == 40


def test_fit_pca_recovers_subspace_and_roundtrips(tmp_path):
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(32, 4)))[0].T  # 4 orthonormal directions in 32-d
    x = rng.normal(size=(2000, 4)) * [5, 4, 3, 2] @ basis + 0.01 * rng.normal(size=(2000, 32)) + 1.0
    p = pca_mod.fit_pca(x, 4, "test-model", {"command": "test"})
    np.testing.assert_allclose(np.abs(p.components @ basis.T).max(1), 1.0, atol=5e-3)
    q = pca_mod.load_pca(p.save(tmp_path / "p.npz"))
    assert q.pca_id == p.pca_id and q.record["command"] == "test"
    np.testing.assert_array_equal(q.components, p.components)
    np.testing.assert_allclose(np.linalg.norm(q.transform(x[:5]), axis=1), 1.0, atol=1e-6)


def test_fit_pca_cli_on_a_folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        (photos / f"{name}.png").write_bytes(png_bytes(getattr(data, name)()[::2, ::2].copy()))
    out = tmp_path / "pca.npz"
    assert fit_pca.main(["--model", "effnet-lite0", "--dim", "8", "--out", str(out), str(photos)]) == 0
    p = pca_mod.load_pca(out)
    assert p.dim == 8 and p.pca_id.startswith("effnet-lite0-pca8-")
    assert sorted(p.record["photos"]) == ["chelsea.png", "coffee.png"]


