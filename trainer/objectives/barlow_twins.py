"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction").

One encoder: backbone -> projector (3 linear layers, the first two followed by BN and ReLU, 8192 wide in
the paper; the last without bias, which the standardisation would cancel anyway). The two views'
projections are standardised per dimension over the batch (BN without affine) and their cross-correlation
C [D, D] is driven to the identity: sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, lambda = 5.1e-3.

C is a global batch quantity: the projections are gathered from every process with gradient before the
standardisation and the product, so the statistics and C are those of the whole batch (the paper's SyncBN
and all-reduced C) and 2 processes compute the loss and gradients of 1 process on the concatenated batch.
The augmentations are BYOL's, asymmetric (view0 blur 1.0 / solarize 0.0, view1 blur 0.1 / solarize 0.2).
Collapse is reported as ``embedding_std`` of view0's projections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import view_configs
from trainer.distributed import gather_with_grad
from trainer.losses.noncontrastive import barlow_twins
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .byol import PAPER_AUGMENT, PAPER_SECOND_VIEW
from .diagnostics import embedding_std
from .options import require_at_least, require_non_negative


@dataclass
class BarlowTwinsOptions:
    lambd: float = 5.1e-3              # weight of the off-diagonal (redundancy reduction) term
    projection_dim: int = 8192         # paper 8192
    projection_hidden_dim: int = 8192  # paper 8192
    projection_layers: int = 3
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0's AugmentConfig fields
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        require_non_negative(self, "lambd")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class BarlowTwins(Objective):
    key = "barlow_twins"
    Options = BarlowTwinsOptions

    def __init__(self, spec: ObjectiveSpec, options: BarlowTwinsOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)
        # The loss standardises each dimension, so a bias there would get no gradient: drop it, as the paper.
        self.projector[-1].register_parameter("bias", None)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder.encode_image(batch["view0"]))  # one pass per view, as the paper
        z2 = self.projector(self.encoder.encode_image(batch["view1"]))
        loss = barlow_twins(gather_with_grad(z1), gather_with_grad(z2), self.options.lambd)
        return {"loss": loss, "embedding_std": embedding_std(z1)}
