"""Multi-crop views (Caron et al. 2020, SwAV sec. 3.2; reused by DINO): two global crops at the model's
image size and V local crops at a smaller size, each with SimCLR's augmentation family.

The papers crop 2 x 224 px (scale 0.14-1) + V x 96 px (scale 0.05-0.14) from ImageNet images; at CIFAR scale
that is 2 x 32 px + V x 16 px with the same scale ranges. Keys are ``global0``, ``global1``, ``local0`` ...;
every key has a fixed shape, so the data loader stacks them into batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.data.views import AugmentConfig, augmentation


@dataclass
class MultiCropOptions:
    """The multi-crop options SwAV and DINO share (their ``Options`` extend this)."""

    num_local_crops: int = 6
    local_crop_size: int = 16          # paper 96 px next to 224 px global crops
    global_crop_scale: tuple = (0.14, 1.0)
    local_crop_scale: tuple = (0.05, 0.14)
    augment: dict = field(default_factory=lambda: {"jitter_strength": 0.5, "jitter_prob": 0.8,
                                                   "grayscale_prob": 0.2, "blur_prob": 0.0})
    # True: one backbone pass per resolution (DINO's MultiCropWrapper: BN statistics over all crops of a size).
    # False: one pass per crop, as lightly's examples do, the default: faster on CPU at large batches, where a
    # joint pass falls out of cache (tests/benchmarks/RESULTS_training_speed.md, "Design measurements").
    encode_crops_jointly: bool = False


class MultiCropViews:
    """Picklable view recipe ``(PIL image, sample) -> {global0, global1, local0, ..., local{V-1}}``.

    Args:
        global_size, local_size: output sides in pixels of the global and local crops.
        mean, std: normalisation of the backbone.
        num_local: V, the number of local crops (0 allowed: two-view training).
        config: the augmentation family (colour jitter, grayscale, blur, flip); its ``crop_scale`` is replaced
            by ``global_scale`` / ``local_scale``.
        num_global: global crops (2 in both papers).
    """

    def __init__(self, global_size: int, local_size: int, mean, std, num_local: int,
                 config: AugmentConfig | None = None, global_scale=(0.14, 1.0), local_scale=(0.05, 0.14),
                 num_global: int = 2):
        if num_global < 1 or num_local < 0:
            raise ValueError(f"multi-crop needs >= 1 global and >= 0 local crops, got {num_global} and {num_local}")
        if not 0 < local_size <= global_size:
            raise ValueError(f"local crop size must be in (0, {global_size}], got {local_size}")
        for name, scale in (("global", global_scale), ("local", local_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} crop scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
        config = config or AugmentConfig()
        self.num_global, self.num_local = num_global, num_local
        self.global_transform = augmentation(global_size, mean, std, dataclasses.replace(config, crop_scale=tuple(global_scale)))
        self.local_transform = augmentation(local_size, mean, std, dataclasses.replace(config, crop_scale=tuple(local_scale)))

    def keys(self) -> list[str]:
        return [f"global{i}" for i in range(self.num_global)] + [f"local{i}" for i in range(self.num_local)]

    def __call__(self, image, sample) -> dict:
        views = {f"global{i}": self.global_transform(image) for i in range(self.num_global)}
        views.update({f"local{i}": self.local_transform(image) for i in range(self.num_local)})
        return views


def crops_in_order(batch: dict) -> list[torch.Tensor]:
    """The crops of a multi-crop batch as a list: globals first, then locals, each [N, C, H, W]."""
    globals_ = sorted((k for k in batch if k.startswith("global")), key=lambda k: int(k[len("global"):]))
    locals_ = sorted((k for k in batch if k.startswith("local")), key=lambda k: int(k[len("local"):]))
    if len(globals_) < 2:
        raise ValueError(f"a multi-crop batch needs global0 and global1, got keys {sorted(batch)}")
    return [batch[k] for k in globals_ + locals_]


@torch.no_grad()
def accepted_local_size(backbone: nn.Module, global_size: int, local_size: int, channels: int = 3) -> int:
    """``local_size`` if ``backbone`` runs on images of that side, else ``global_size``.

    CNNs pool globally and take any size; ViTs built with a fixed input size (timm without
    ``dynamic_img_size``, open_clip) refuse other sizes, so their local crops are rendered at the global size
    (the crop scale still makes them local). Probed once on zeros in eval mode: no random numbers are drawn.
    """
    if local_size == global_size:
        return local_size
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        backbone(torch.zeros(2, channels, local_size, local_size, device=device))
        return local_size
    except (RuntimeError, AssertionError, ValueError):
        return global_size
    finally:
        backbone.train(was_training)


def encode_crops(encode, crops: list[torch.Tensor], jointly: bool = False) -> torch.Tensor:
    """The features of all crops in order, [V * N, D]: ``encode`` once per crop, or with ``jointly`` once per run
    of consecutive same-size crops (DINO's MultiCropWrapper, so batch norm sees all crops of one resolution)."""
    if not jointly:
        return torch.cat([encode(crop) for crop in crops])
    outputs, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        outputs.append(encode(torch.cat(crops[start:end])))
        start = end
    return torch.cat(outputs)
