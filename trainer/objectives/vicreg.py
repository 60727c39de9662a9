"""VICReg (Bardes, Ponce & LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning").

One encoder: backbone -> expander (3 linear layers, the first two followed by BN and ReLU, 8192 wide in the
paper). The two views' expansions z, z' are trained with lambda s + mu v + nu c (``trainer.losses.vicreg``):
invariance s = MSE(z, z'); variance v = mean over dimensions of max(0, 1 - sqrt(Var + 1e-4)), averaged over the
two views; covariance c = sum of squared off-diagonal covariances / D, summed over the two views;
lambda / mu / nu = 25 / 25 / 1. The augmentations are BYOL's (asymmetric blur / solarize), as in the paper.

Implementation choices: the expansions are gathered from every process with gradient before the loss, so the
variance and covariance are those of the GLOBAL batch (the authors' ``FullGatherLayer``) and 2 processes
compute the loss and gradients of 1 process on the concatenated batch. The expander's last layer has no bias
(the authors' code; every term is blind to a bias shared by both views). Collapse is reported as
``embedding_std`` of view0's expansions, beside the three unweighted terms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import view_configs
from trainer.distributed import gather_with_grad
from trainer.losses.vicreg import vicreg
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .byol import PAPER_AUGMENT, PAPER_SECOND_VIEW
from .diagnostics import embedding_std
from .options import require_at_least, require_non_negative, require_positive


@dataclass
class VICRegOptions:
    invariance_weight: float = 25.0    # lambda, on the MSE between the views' expansions
    variance_weight: float = 25.0      # mu, on the std hinge (target 1)
    covariance_weight: float = 1.0     # nu, on the off-diagonal covariance
    eps: float = 1e-4                  # inside sqrt(Var + eps)
    projection_dim: int = 8192         # expander output (paper 8192)
    projection_hidden_dim: int = 8192  # expander hidden width (paper 8192)
    projection_layers: int = 3         # linear layers in the expander (paper 3)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0's AugmentConfig fields
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        require_non_negative(self, "invariance_weight", "variance_weight", "covariance_weight")
        require_positive(self, "eps")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class VICReg(Objective):
    key = "vicreg"
    Options = VICRegOptions

    def __init__(self, spec: ObjectiveSpec, options: VICRegOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)
        self.projector[-1].register_parameter("bias", None)  # the authors' expander: last layer without bias

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder.encode_image(batch["view0"]))  # one pass per view, as the paper
        z2 = self.projector(self.encoder.encode_image(batch["view1"]))
        o = self.options
        terms = vicreg(gather_with_grad(z1), gather_with_grad(z2), o.invariance_weight, o.variance_weight,
                       o.covariance_weight, o.eps)
        return {"loss": terms.loss, "invariance": terms.invariance.detach(), "variance": terms.variance.detach(),
                "covariance": terms.covariance.detach(), "embedding_std": embedding_std(z1)}
