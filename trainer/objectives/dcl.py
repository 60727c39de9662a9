"""DCL and DCLW (Yeh et al. 2022, "Decoupled Contrastive Learning").

SimCLR's setting (two augmented views, the 2-layer MLP projection head dropped at export, the 2N - 2 other
views of the global batch as negatives) with the paper's decoupled loss: the positive pair is removed from the
denominator of NT-Xent, which takes away the 1 - p+ factor that shrinks the gradient at small batches
(``trainer.losses.dcl``). ``dclw`` adds the paper's negative von Mises-Fisher weighting of the positive term
(sigma 0.5): hard positives weigh more than 1, easy ones less, 1 on average over the batch.

Implementation choices: projections are gathered from all processes with gradient, so anchors, negatives and
DCLW's weights (a softmax over the batch) are the global batch's, as on one device holding it; tau defaults
to the paper's 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.views import view_configs
from trainer.losses.dcl import dcl, dclw

from .base import register
from .diagnostics import embedding_std
from .options import require_at_least, require_positive
from .two_view import TwoViewObjective, TwoViewOptions


@dataclass
class DCLOptions(TwoViewOptions):
    temperature: float = 0.1  # tau (paper 0.1; DCL is far less sensitive to it than NT-Xent)

    def __post_init__(self) -> None:
        require_positive(self, "temperature")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class DCL(TwoViewObjective):
    key = "dcl"
    Options = DCLOptions

    def decoupled_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return dcl(z1, z2, self.options.temperature)

    def loss_from_projections(self, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        loss = self.decoupled_loss(z1, z2)
        with torch.no_grad():  # mean positive cosine: what the decoupled loss pulls up without the coupling
            alignment = (F.normalize(z1.detach(), dim=1) * F.normalize(z2.detach(), dim=1)).sum(dim=1).mean()
        return {"loss": loss, "alignment": alignment, "embedding_std": embedding_std(z1)}


@dataclass
class DCLWOptions(DCLOptions):
    sigma: float = 0.5  # the vMF weighting's temperature (paper 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "sigma")


@register
class DCLW(DCL):
    key = "dclw"
    Options = DCLWOptions

    def decoupled_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return dclw(z1, z2, self.options.temperature, self.options.sigma)
