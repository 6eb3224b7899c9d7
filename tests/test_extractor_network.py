"""Extractor service: the networks. The shipped effnet-lite0 weights classify real
photos; the receptive-field geometry the models walk equals the input-gradient support
(and extracted locations are receptive-field centres in the photo's pixels); the
ResNet50 backbone and a trained attention head load from weight files.
"""
from __future__ import annotations

import dataclasses

import extractor_fixtures  # noqa: F401 - first: sets the test Redis

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from delf_extractor import models
from delf_extractor.extract import DelfExtractor


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("variant", [0, 1, 2])
@pytest.mark.parametrize("name, classes", [("chelsea", range(281, 286)),  # tabby .. Egyptian cat
                                           ("coffee", (967, 968, 504))])  # espresso, cup, coffee mug
def test_lite_weights_classify_real_photos(variant, name, classes):
    """Each EfficientNet-Lite the presets can use is built right: its shipped ImageNet
    weights load strictly and name what real photos show."""
    net = models.load_lite(variant)
    img = cv2.resize(getattr(data, name)(), (224, 224), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() - 127) / 128
    with torch.inference_mode():
        probs = net(x).softmax(1)[0]
    assert int(probs.argmax()) in classes
    assert float(probs[list(classes)].sum()) > 0.8


# --------------------------------------------------------------------------- geometry


def _linearised(backbone: nn.Module) -> nn.Module:
    """Same geometry, every path positive: averaging convolutions, identity BatchNorm,
    average instead of max pooling. The input gradient of a cell is then non-zero on
    exactly its receptive field."""
    for name, m in list(backbone.named_modules()):
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            nn.init.constant_(m.weight, 1.0 / fan_in)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
        elif isinstance(m, nn.MaxPool2d):
            parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
            setattr(parent, name.rpartition(".")[2], nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
    return backbone.double().eval()


def _support(grad: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    g = grad.abs().sum(dim=(0, 1))
    rows, cols = torch.nonzero(g.sum(1)).flatten(), torch.nonzero(g.sum(0)).flatten()
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


@pytest.mark.parametrize("model, size", [
    ("effnet-lite0", (360, 376)), ("effnet-lite0", (361, 377)),  # TF 'same' padding differs by parity
    ("delf-resnet50", (300, 317)),
])
def test_walked_geometry_equals_gradient_support(model, size):
    net = models.build_model(model, pretrained=False)
    gy, gx = net.geometry(*size)
    assert gy.stride == gx.stride == 16
    probe = _linearised(net.backbone)
    x = torch.full((1, 3, *size), 0.01, dtype=torch.float64, requires_grad=True)
    out = probe(x)
    # a cell whose whole receptive field lies inside the image
    i = next(i for i in range(out.shape[2]) if gy.stride * i - gy.padding >= 0)
    j = next(j for j in range(out.shape[3]) if gx.stride * j - gx.padding >= 0)
    assert gy.stride * i - gy.padding + gy.rf <= size[0] and gx.stride * j - gx.padding + gx.rf <= size[1]
    out[0, :, i, j].sum().backward()
    (y0, y1), (x0, x1) = _support(x.grad)
    assert (y0, y1) == (gy.stride * i - gy.padding, gy.stride * i - gy.padding + gy.rf - 1)
    assert (x0, x1) == (gx.stride * j - gx.padding, gx.stride * j - gx.padding + gx.rf - 1)
    assert (y0 + y1) / 2 == gy.centre(i) and (x0 + x1) / 2 == gx.centre(j)


@pytest.mark.parametrize("scale, size", [(1.0, (360, 392)), (0.5, (721, 785))])
def test_extracted_locations_are_receptive_field_centres_in_photo_pixels(scale, size):
    """Through the pyramid resize: the input-gradient support of a cell, in the submitted
    photo's pixels, is centred on the location extract() reports for that cell."""
    cfg = dataclasses.replace(models.get_config("effnet-lite0"), scales=(scale,), border_px=0,
                              max_features=10**6, max_image_side=None)
    ex = DelfExtractor(config=cfg, device="cpu", pca=None, pretrained=False)
    _linearised(ex.net.backbone).float()
    h, w = size
    feats = ex.extract(np.full((h, w, 3), 128, np.uint8))
    lh, lw = round(h * scale), round(w * scale)
    gy, gx = ex.net.geometry(lh, lw)
    x = torch.full((1, 3, h, w), 128.0, requires_grad=True)
    level = x if scale == 1.0 else F.interpolate(x, size=(lh, lw), mode="bilinear", align_corners=False,
                                                 antialias=True)
    out, _ = ex.net(level)
    assert len(feats) == out.shape[2] * out.shape[3]
    i = next(i for i in range(out.shape[2]) if gy.stride * i - gy.padding - 2 >= 0)
    j = next(j for j in range(out.shape[3]) if gx.stride * j - gx.padding - 2 >= 0)
    out[0, :, i, j].sum().backward()
    (y0, y1), (x0, x1) = _support(x.grad)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    dist = np.linalg.norm(feats.locations - centre, axis=1)
    assert dist.min() <= 1.0, (centre, feats.locations[dist.argmin()])
    assert feats.scales[dist.argmin()] == pytest.approx(1 / scale)


# --------------------------------------------------------------------------- ResNet50


def test_resnet50_builds_with_random_weights_at_stride_16():
    net = models.build_model("delf-resnet50", pretrained=False)
    with torch.inference_mode():
        feats, scores = net(torch.rand(1, 3, 224, 320) * 255)
    assert feats.shape == (1, 1024, 14, 20) and scores.shape == (1, 14, 20)
    gy, gx = net.geometry(224, 320)
    # torchvision's ResNet (stride in the 3x3 conv) sees 267 px at conv4; the paper's 291 px
    # belongs to the original ResNet with the stride in the first 1x1 conv
    assert (gy.stride, gy.rf, gy.padding) == (16, 267, 133) == (gx.stride, gx.rf, gx.padding)


def test_resnet50_missing_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(models.WeightsNotFound) as err:
        models.build_model("delf-resnet50")
    msg = str(err.value)
    assert "resnet50-*.pth" in msg and "IMAGENET1K_V1" in msg
    assert str(tmp_path / "weights") in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg


def test_resnet50_weights_found_in_weights_dir(tmp_path, monkeypatch):
    import torchvision

    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet50-0123abcd.pth")
    monkeypatch.setenv("DELF_WEIGHTS_DIR", str(tmp_path))
    net = models.build_model("delf-resnet50")
    assert torch.equal(net.backbone[6][0].conv1.weight, state["layer3.0.conv1.weight"])


def test_trained_attention_head_plugs_in_from_a_weight_file(tmp_path, monkeypatch):
    head = models.AttentionHead(112, 512)
    torch.save(head.state_dict(), tmp_path / "att.pth")
    monkeypatch.setenv("DELF_WEIGHTS_DIR", str(tmp_path))
    cfg = dataclasses.replace(models.get_config("effnet-lite0"), score="attention", attention_weights="att.pth")
    net = models.build_model(cfg)
    x = torch.rand(1, 3, 128, 160) * 255
    with torch.inference_mode():
        feats, scores = net(x)
        assert torch.allclose(scores, head(feats)) and (scores > 0).all()
    with pytest.raises(ValueError, match="attention_weights"):
        models.build_model(dataclasses.replace(cfg, attention_weights=None))




@pytest.mark.parametrize("name", [n for n in models.MODEL_CONFIGS if models.MODEL_CONFIGS[n].backbone != "resnet50"])
def test_every_offline_preset_builds_with_its_pca(name):
    """Every preset that runs offline loads its weights, and its PCA artifact takes the
    descriptors the network gives: a user can switch DELF_MODEL to any of them."""
    from delf_extractor.pca import default_path, load_pca

    cfg = models.get_config(name)
    net = models.build_model(cfg)
    with torch.inference_mode():
        feats, scores = net(torch.full((1, 3, 160, 192), 128.0))
    assert feats.shape[1] == cfg.channels and scores.shape == feats.shape[:1] + feats.shape[2:]
    pca = load_pca(default_path(cfg))
    assert pca.mean.shape == (cfg.channels,) and pca.components.shape == (cfg.pca_dim, cfg.channels)
    assert pca.model == (cfg.pca_model or cfg.name)
