"""Backbone registry: a name -> an image feature extractor with a known output dimension.

Names: ``cnn-small`` (a 4-stage CNN for CPU demos and tests), ``resnet18-cifar`` (3x3 stem, no max-pool, for 32 px images), torchvision ``resnet18/34/50``,
``timm:<name>`` and ``open_clip:<name>``; every one randomly initialised (nothing is ever downloaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Backbone:
    """A feature extractor [N, C, H, W] -> [N, feature_dim] and the normalisation it expects."""

    module: nn.Module
    feature_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_size: int | None = None  # the input size the model requires, if fixed (ViTs)


def _torchvision_resnet(depth: int, cifar_stem: bool, image_size: int) -> Backbone:
    import torchvision

    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if cifar_stem:
        # CIFAR variant (SimCLR appendix B.9): 3x3 stride-1 first conv and no max-pool keep 32 px detail.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    mean, std = (CIFAR_MEAN, CIFAR_STD) if cifar_stem else (IMAGENET_MEAN, IMAGENET_STD)
    return Backbone(model, feature_dim, mean, std)


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU stages (32-64-128-256 channels) with 2x pooling, global average pool: a backbone
    that trains in minutes on a CPU (demo, tests), ~0.3M parameters."""

    def __init__(self, channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        previous = channels
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images)).flatten(1)


def _timm(name: str, image_size: int) -> Backbone:
    import timm

    kwargs = {"pretrained": False, "num_classes": 0}
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:  # CNNs take no img_size
        model = timm.create_model(name, **kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return Backbone(model, int(model.num_features), mean, std)


def _open_clip(name: str, image_size: int) -> Backbone:
    import open_clip

    model = open_clip.create_model(name, pretrained=None, force_image_size=image_size)
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)
    return Backbone(visual, int(visual.output_dim), mean, std, native_size=image_size)


_NAMED: dict[str, Callable[[int], Backbone]] = {
    "cnn-small": lambda size: Backbone(SmallConvNet(), 256, CIFAR_MEAN, CIFAR_STD),
    "resnet18-cifar": lambda size: _torchvision_resnet(18, True, size),
    "resnet34-cifar": lambda size: _torchvision_resnet(34, True, size),
    "resnet18": lambda size: _torchvision_resnet(18, False, size),
    "resnet34": lambda size: _torchvision_resnet(34, False, size),
    "resnet50": lambda size: _torchvision_resnet(50, False, size),
}


def list_backbones() -> list[str]:
    return sorted(_NAMED) + ["timm:<name>", "open_clip:<name>"]


def build_backbone(name: str, image_size: int = 32) -> Backbone:
    """Build a randomly initialised backbone by registry name; unknown names raise ``KeyError``."""
    if name in _NAMED:
        return _NAMED[name](image_size)
    family, _, model_name = name.partition(":")
    if family == "timm" and model_name:
        return _timm(model_name, image_size)
    if family == "open_clip" and model_name:
        return _open_clip(model_name, image_size)
    raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")


@torch.no_grad()
def probe_feature_dim(module: nn.Module, image_size: int, channels: int = 3) -> int:
    """The output width of ``module`` on one dummy image (for backbones that do not declare it)."""
    was_training = module.training
    module.eval()
    out = module(torch.zeros(2, channels, image_size, image_size))
    module.train(was_training)
    return int(out.shape[-1])
