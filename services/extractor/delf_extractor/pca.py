"""PCA of DELF descriptors: fit, versioned artifact, and the ``delf fit-pca`` command.

DELF reduces its L2-normalised local features with PCA and L2-normalises again
(no whitening, as the reference configuration). The projection is learned from
the descriptors the extractor itself selects (same pyramid, same top-k), since
those are the ones that will be reduced.

An artifact is an .npz with ``mean`` (D,), ``components`` (d, D), ``explained_variance``
(d,), ``model``, ``pca_id`` = ``{model}-pca{d}-{first 8 hex of sha256(mean, components)}``
and ``record`` (JSON: the command, photos and counts used to fit it). The pca_id
travels with every feature set, so an index can refuse descriptors of another projection.

The shipped artifacts (``weights/*-pca*.npz``; each preset names its default in
``ModelConfig.pca_file``) were produced by ``delf fit-pca --model MODEL --dim D``
(`delf_extractor.fit_pca`, which runs the extractor, so it lives apart from this module).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from delf_extractor import models

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


def configured_path(cfg: models.ModelConfig, value: str | None = None) -> Path:
    """The PCA artifact `value` (default: DELF_PCA, read now) names (a path, or a shipped
    artifact's name), else the model's shipped one."""
    if value is None:
        from delf_extractor.settings import ExtractorSettings

        value = ExtractorSettings.from_env().pca
    value = value.strip()
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
