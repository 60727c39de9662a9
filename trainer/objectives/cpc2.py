"""CPC v2 (Hénaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding").

CPC v1 (``trainer/objectives/cpc.py``) with the paper's changes:
- layer norm instead of batch norm in the patch encoder (batch statistics let patches see each other):
  every BatchNorm2d of the backbone becomes GroupNorm(1, C), kept in the exported model
  (``ModelConfig.backbone_norm = "layer"``);
- predictions in several directions: top-down, bottom-up, left-to-right and right-to-left, each with its own
  context network and W_k, the loss averaged over directions;
- larger patches relative to the image: 12 px at stride 4 of a 32 px image (a 6 x 6 grid), and, as in the
  paper's Algorithm 1, only rows that share no pixels with the context row are predicted (skip_steps 2:
  k = 3, 4), targets are a linear projection of z (64-d) and predictions are scaled by 0.1;
- patch-level augmentation, each patch on its own, in the data workers: a random crop resized back to the
  patch size and a horizontal flip, and colour dropping (two of the three channels zeroed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.patches import PatchAugmentConfig, PatchGridViews

from .base import ObjectiveSpec, register
from .cpc import CPC, DIRECTIONS, CPCOptions


@dataclass
class CPC2Options(CPCOptions):
    patch: int = 12
    stride: int = 4
    prediction_steps: int = 4
    skip_steps: int = 2
    target_dim: int | None = 64
    prediction_scale: float = 0.1
    layer_norm: bool = True
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    patch_crop_scale: tuple[float, float] = (0.6, 1.0)  # per-patch random crop (area), resized back
    patch_flip: float = 0.5                             # per-patch horizontal flip
    colour_drop: float = 1.0                            # per-patch probability of dropping two of three channels


@register
class CPC2(CPC):
    key = "cpc2"
    Options = CPC2Options

    def __init__(self, spec: ObjectiveSpec, options: CPC2Options):
        super().__init__(spec, options)
        self.patch_augment = PatchAugmentConfig(options.patch_crop_scale, options.patch_flip, options.colour_drop)

    def views(self) -> PatchGridViews:
        config, options = self.encoder.config, self.options
        return PatchGridViews(config.image_size, options.patch, options.stride, config.mean, config.std,
                              options.crop_scale, options.flip, self.patch_augment)
