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


def _torchvision_resnet(depth: int, cifar_stem: bool, image_size: int, channels: int = 3) -> Backbone:
    import torchvision

    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if cifar_stem:
        # CIFAR variant (SimCLR appendix B.9): 3x3 stride-1 first conv and no max-pool keep 32 px detail.
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
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


def _timm(name: str, image_size: int, channels: int = 3, **extra) -> Backbone:
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": channels, **extra}
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:  # CNNs take no img_size
        model = timm.create_model(name, **kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return Backbone(model, int(model.num_features), mean, std)


def _vit_cifar(image_size: int, channels: int, width: int, depth: int, heads: int, **vit_options) -> Backbone:
    """A ViT for small images (patch 4 at 32 px, as in MoCo v3's and DINO's CIFAR ablations); the class
    token's final representation is the feature unless ``global_pool="avg"`` (mean of the patch tokens). The patch
    projection is ``module.patch_embed``."""
    patch = 4 if image_size <= 64 else 16
    options = {"global_pool": "token", **vit_options}
    return _timm("vit_tiny_patch16_224", image_size, channels, patch_size=patch, embed_dim=width, depth=depth,
                 num_heads=heads, **options)


def _open_clip(name: str, image_size: int, channels: int = 3) -> Backbone:
    import open_clip

    if channels != 3:
        raise ValueError(f"open_clip:{name} takes 3-channel images, not {channels}")
    model = open_clip.create_model(name, pretrained=None, force_image_size=image_size)
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)
    return Backbone(visual, int(visual.output_dim), mean, std, native_size=image_size)


BackboneFactory = Callable[..., Backbone]  # (image_size, channels) -> Backbone; ViTs also take ViT options

_NAMED: dict[str, BackboneFactory] = {
    "cnn-small": lambda size, ch: Backbone(SmallConvNet(ch), 256, CIFAR_MEAN, CIFAR_STD),
    "resnet18-cifar": lambda size, ch: _torchvision_resnet(18, True, size, ch),
    "resnet34-cifar": lambda size, ch: _torchvision_resnet(34, True, size, ch),
    "resnet18": lambda size, ch: _torchvision_resnet(18, False, size, ch),
    "resnet34": lambda size, ch: _torchvision_resnet(34, False, size, ch),
    "resnet50": lambda size, ch: _torchvision_resnet(50, False, size, ch),
    "vit-tiny-cifar": lambda size, ch, **vit: _vit_cifar(size, ch, **vit, width=192, depth=6, heads=3),
    "vit-small-cifar": lambda size, ch, **vit: _vit_cifar(size, ch, **vit, width=384, depth=8, heads=6),
    # Tests and CPU demos of the ViT-only objectives (MSN, ...): a 3-step run in seconds.
    "vit-micro-cifar": lambda size, ch, **vit: _vit_cifar(size, ch, **vit, width=64, depth=2, heads=2),
}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Add a named backbone: ``factory(image_size, channels) -> Backbone``."""
    if name in _NAMED:
        raise ValueError(f"backbone {name!r} is already registered")
    _NAMED[name] = factory


def list_backbones() -> list[str]:
    return sorted(_NAMED) + ["timm:<name>", "open_clip:<name>"]


VIT_POOLS = ("token", "avg")


def is_vit_name(name: str) -> bool:
    """True for the names of ViT backbones (``vit-*-cifar``, ``timm:vit_*``): those with patch tokens."""
    return name.startswith("vit-") or name.startswith("timm:vit")


def _vit_options(name: str, register_tokens: int, vit_pool: str | None) -> dict:
    """timm ``VisionTransformer`` keyword arguments for the ViT options (only those that are set)."""
    if register_tokens < 0:
        raise ValueError(f"register_tokens must be >= 0, got {register_tokens}")
    if vit_pool is not None and vit_pool not in VIT_POOLS:
        raise ValueError(f"vit_pool must be one of {VIT_POOLS} (class token, mean of the patch tokens), "
                         f"got {vit_pool!r}")
    options: dict = {}
    if register_tokens:
        options["reg_tokens"] = int(register_tokens)
    if vit_pool is not None:
        # fc_norm=False keeps timm's final norm on every token before pooling (timm's default for "avg" moves it
        # after the pool), so the patch tokens objectives read are normed whichever pooling is exported.
        options.update(global_pool=vit_pool, fc_norm=False)
    return options


def build_backbone(name: str, image_size: int = 32, channels: int = 3, register_tokens: int = 0,
                   vit_pool: str | None = None) -> Backbone:
    """Build a randomly initialised backbone by registry name for ``channels``-channel input images;
    unknown names raise ``KeyError``. Mean/std are the family's defaults for those channels.

    ViT options (``vit-*-cifar`` and ``timm:vit_*``; a ValueError for other backbones): ``register_tokens``
    learnable register tokens after the class token (Darcet et al. 2024), and ``vit_pool`` the exported feature,
    "token" (the class token) or "avg" (mean of the patch tokens, without class and registers); None keeps the
    backbone's default (the class token for ``vit-*-cifar``, timm's for ``timm:vit_*``)."""
    vit = _vit_options(name, register_tokens, vit_pool)
    if vit and not is_vit_name(name):
        raise ValueError(f"register_tokens and vit_pool apply to ViT backbones (vit-*-cifar, timm:vit_*), "
                         f"not {name!r}")
    if name in _NAMED:
        backbone = _NAMED[name](image_size, channels, **vit)
    else:
        family, _, model_name = name.partition(":")
        if family == "timm" and model_name:
            backbone = _timm(model_name, image_size, channels, **vit)
        elif family == "open_clip" and model_name:
            backbone = _open_clip(model_name, image_size, channels)
        else:
            raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    if len(backbone.mean) != channels:  # e.g. grayscale input to an RGB-normalised family
        backbone.mean = tuple([sum(backbone.mean) / len(backbone.mean)] * channels)
        backbone.std = tuple([sum(backbone.std) / len(backbone.std)] * channels)
    return backbone

