"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two augmented views of each image, a 2-layer MLP projection head (removed at export), and NT-Xent over
the global batch: embeddings are gathered from all processes with gradient, so each anchor sees
2(N_global - 1) negatives exactly as on one device holding the whole batch.

The ``loss`` option swaps NT-Xent for another loss of the InfoNCE family (``trainer.losses.nce_family``:
nce, flatnce, debiased (tau_plus), hcl (tau_plus, beta)) over the same per-anchor positive and 2N-2
negatives; the default ``infonce`` is NT-Xent itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import AugmentConfig, TwoViews
from trainer.distributed import gather_with_grad
from trainer.losses import (CONTRASTIVE_LOSSES, contrastive_loss_from_similarities, loss_options_for, nt_xent,
                            two_view_similarities)
from trainer.models import ModelConfig, projection_mlp

from .base import Objective, ObjectiveSpec, register


@dataclass
class SimCLROptions:
    temperature: float = 0.5
    projection_dim: int = 128
    projection_hidden_dim: int = 2048
    projection_layers: int = 2
    augment: dict = field(default_factory=dict)  # AugmentConfig fields
    loss: str = "infonce"  # infonce | nce | flatnce | debiased | hcl
    tau_plus: float = 0.1  # debiased / hcl: class prior of false negatives (Chuang et al.: 0.1 on CIFAR-10)
    beta: float = 1.0  # hcl: concentration on hard negatives (Robinson et al.: 0.5-1 on CIFAR-10)
    noise_probability: float | None = None  # nce: Pn; None -> 1/(2N-1), the other views as noise universe
    normaliser: float | None = None  # nce: Z; None -> estimated from each batch

    def __post_init__(self):
        if self.loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"simclr: unknown loss {self.loss!r}; known: {', '.join(CONTRASTIVE_LOSSES)}")


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
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if self.options.loss == "infonce":
            return {"loss": nt_xent(z1, z2, self.options.temperature)}
        positive, negatives = two_view_similarities(z1, z2)
        options = loss_options_for(self.options.loss, vars(self.options))
        loss = contrastive_loss_from_similarities(self.options.loss, positive, negatives, self.options.temperature, **options)
        return {"loss": loss}

