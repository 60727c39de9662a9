"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

One view per image (random resized crop, scale 0.67-1 and aspect 3/4-4/3, and a horizontal flip: the authors'
pre-training transform). The image is tiled by mask patches larger than the ViT's patches (``mask_patch_size``
px, SimMIM's 32 px) and ``mask_ratio`` of them (0.6) are masked at random, the count rounded up
(``trainer.data.masking.coarse_random_mask``, drawn per image in the data workers and carried as the boolean
``mask/image``). Masked patches enter the encoder as a learnable mask token in place of their patch embedding,
and every token goes through the ViT (``forward_vit(mask=..., mask_token=...)``). A one-layer linear head maps
each encoded patch token to the raw pixels of its patch (the authors' 1 x 1 convolution + pixel shuffle is the
same linear map per patch), and the loss is the L1 error on the pixels of the masked patches only
(``masked_pixel_l1``).

Implementation choices: targets are patches of the image the encoder is given, i.e. after the run's mean/std
normalisation, as the authors' loss compares against the normalised input. The exported feature is the mean of
the patch tokens (``vit_pool="avg"``): SimMIM's ViTs are evaluated by fine-tuning with average pooling. The head
reads the ViT's final normalised tokens (``final_tokens``: SimMIM's encoder ends with a LayerNorm on every
token). Weight decay as the authors' ViT optimiser groups: none on biases, 1-D parameters, the class token and
the position embedding; the [1, 1, D] mask token takes it. The loss is a mean over a fixed number of masked
pixels per image, so DDP's gradient average equals the global-batch loss.
Deviations: 32 px images with 8 px mask patches (2 x 2 ViT patches at patch 4; the paper's 32 px mask patch is
1/6 of its 192 px image, 8 px is 1/4 of 32 px and the smallest mask patch larger than the ViT patch); the
repository's timm ViT (learnable absolute position embedding, no shared relative position bias, no layer scale,
no drop path) with timm's initialisation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.data.masking import WithKeepIndices, coarse_random_mask
from trainer.data.views import AugmentConfig, OneView, view_configs
from trainer.losses.masked_pixels import masked_pixel_l1
from trainer.models import ModelConfig
from trainer.models.vit import forward_vit, patch_grid, patch_size, patchify, vit_backbone

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std
from .mae import final_tokens
from .options import as_number, require_at_least

# The authors' transform: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3, torchvision's default ratio) + flip.
PAPER_AUGMENT = {"crop_scale": [0.67, 1.0], "flip": 0.5, "jitter_prob": 0.0, "grayscale_prob": 0.0,
                 "blur_prob": 0.0}


@dataclass
class SimMIMOptions:
    mask_ratio: float = 0.6               # fraction of the mask patches masked (paper 0.6)
    mask_patch_size: int = 8              # side of a mask patch in px, a multiple of the ViT patch (paper 32 at 192)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields of the view

    def __post_init__(self):
        if not 0.0 < as_number(self, "mask_ratio") < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        require_at_least(self, 1, "mask_patch_size")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class SimMIM(Objective):
    key = "simmim"
    Options = SimMIMOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: SimMIMOptions):
        super().__init__(spec, options)
        vit = vit_backbone(self.encoder, self.key)
        self.grid = patch_grid(vit, spec.image_size)
        self.patch = patch_size(vit)
        size = options.mask_patch_size
        if size % self.patch or spec.image_size % size:
            raise ValueError(f"{self.key}: mask_patch_size {size} must be a multiple of the ViT's patch size "
                             f"{self.patch} and divide the image size {spec.image_size}")
        self.cell = size // self.patch
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # the authors' init
        self.head = nn.Linear(vit.embed_dim, self.patch ** 2 * self.encoder.config.channels)

    def model_config(self, spec: ObjectiveSpec, options: SimMIMOptions) -> ModelConfig:
        return default_model_config(spec, vit_pool="avg")  # SimMIM's ViTs are evaluated with average pooling

    def views(self) -> WithKeepIndices:
        config, o = self.encoder.config, self.options
        view = OneView(config.image_size, config.mean, config.std, AugmentConfig(**o.augment))
        draw = functools.partial(coarse_random_mask, self.grid, self.cell, o.mask_ratio)
        return WithKeepIndices(view, {"image": draw}, key_prefix="mask")

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The base's groups with the ViT's class token and position embedding moved to the group without weight
        decay (the authors' ``no_weight_decay``: pos_embed, cls_token)."""
        vit = vit_backbone(self.encoder, self.key)
        exempt = [p for p in (vit.cls_token, vit.pos_embed) if p is not None and p.requires_grad]
        groups = super().parameter_groups(weight_decay)
        groups[0]["params"] = [p for p in groups[0]["params"] if not any(p is q for q in exempt)]
        groups[1]["params"] += [p for p in exempt if not any(p is q for q in groups[1]["params"])]
        return groups

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, mask = batch["image"], batch["mask/image"]
        vit = vit_backbone(self.encoder, self.key)
        encoded = forward_vit(vit, images, mask=mask, mask_token=self.mask_token)
        predictions = self.head(final_tokens(vit, encoded.patches))
        loss = masked_pixel_l1(predictions, patchify(images, self.patch), mask)
        return {"loss": loss, "embedding_std": embedding_std(encoded.features)}
