"""Alignment + uniformity (Wang & Isola 2020, "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere").

Trains on two augmented views with the paper's direct objective
    L = w_align * L_align(alpha) + w_uniform * (L_uniform(z1; t) + L_uniform(z2; t)) / 2
on L2-normalised projections (the paper's uniformity is taken within each view's batch, as in the authors'
code). Both terms are also logged as metrics ("align", "uniform"). Projections are gathered across processes
with gradient, so uniformity sees the global batch and two processes equal one on the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import AugmentConfig, TwoViews
from trainer.distributed import gather_with_grad
from trainer.losses import alignment, uniformity
from trainer.models import ModelConfig, projection_mlp

from .base import Objective, ObjectiveSpec, register


@dataclass
class AlignUniformOptions:
    alpha: float = 2.0  # paper's default
    t: float = 2.0  # paper's default
    align_weight: float = 1.0  # the authors' STL-10 defaults: weights 1 and 1, alpha 2, t 2
    uniform_weight: float = 1.0
    projection_dim: int = 128
    projection_hidden_dim: int = 512
    projection_layers: int = 2
    augment: dict = field(default_factory=dict)  # AugmentConfig fields


@register
class AlignUniform(Objective):
    key = "align_uniform"
    Options = AlignUniformOptions

    def __init__(self, spec: ObjectiveSpec, options: AlignUniformOptions):
        super().__init__(spec, ModelConfig(backbone=spec.backbone, image_size=spec.image_size, mean=spec.mean, std=spec.std))
        self.options = options
        self.projector = projection_mlp(
            self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim, options.projection_layers
        )

    def views(self) -> TwoViews:
        config = self.encoder.config
        return TwoViews(config.image_size, config.mean, config.std, AugmentConfig(**self.options.augment))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = torch.cat([batch["view0"], batch["view1"]])  # one pass: BN sees both views together
        z1, z2 = self.projector(self.encoder.encode_image(views)).chunk(2)
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        align = alignment(z1, z2, self.options.alpha)
        uniform = 0.5 * (uniformity(z1, self.options.t) + uniformity(z2, self.options.t))
        loss = self.options.align_weight * align + self.options.uniform_weight * uniform
        return {"loss": loss, "align": align.detach(), "uniform": uniform.detach()}
