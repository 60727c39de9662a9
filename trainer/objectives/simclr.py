"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two augmented views of each image, a 2-layer MLP projection head (removed at export), and NT-Xent over
the global batch: embeddings are gathered from all processes with gradient, so each anchor sees
2(N_global - 1) negatives exactly as on one device holding the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import AugmentConfig, TwoViews
from trainer.distributed import gather_with_grad
from trainer.losses import nt_xent
from trainer.models import ModelConfig, projection_mlp

from .base import Objective, ObjectiveSpec, register


@dataclass
class SimCLROptions:
    temperature: float = 0.5
    projection_dim: int = 128
    projection_hidden_dim: int = 2048
    projection_layers: int = 2
    augment: dict = field(default_factory=dict)  # AugmentConfig fields


@register
class SimCLR(Objective):
    key = "simclr"
    Options = SimCLROptions

    def __init__(self, spec: ObjectiveSpec, options: SimCLROptions):
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
        z = self.projector(self.encoder.encode_image(views))
        z1, z2 = z.chunk(2)
        loss = nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.options.temperature)
        return {"loss": loss}
