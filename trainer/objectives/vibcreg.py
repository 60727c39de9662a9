"""VIbCReg (Lee & Aune 2021, "Computer Vision Self-supervised Learning Methods on Time Series"; Variance-
Invariance-better-Covariance Regularization).

VICReg with two changes: the projector (Linear-BN-ReLU, Linear-BN-ReLU, Linear; 4096 wide in the paper) ends
in IterNorm (``trainer.models.whitening``: group whitening by Newton-Schulz iterations, 64 groups, 5
iterations), and the covariance term is taken on the correlation matrix (columns centred and L2-normalised
along the batch), the mean of its squared off-diagonal entries, so its scale no longer depends on D or on the
features' variance. Loss: 25 MSE + 25 (v(z1) + v(z2)) + 200 (c~(z1) + c~(z2)), the authors' weights and sums
(``trainer.losses.vicreg.vibcreg``).

Implementation choices: the paper trains on time series; on images the views are VICReg's (BYOL's
augmentations). The pre-whitening projections are gathered from every process with gradient and whitened as
one batch, so IterNorm's statistics, the variance and the covariance are the GLOBAL batch's and 2 processes
equal 1 (the paper whitens each view's batch as a whole, which this is). Each view is whitened on its own, as
the authors' projector runs per view. Collapse is reported as ``embedding_std`` of view0's projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.distributed import gather_with_grad
from trainer.losses.vicreg import vibcreg
from trainer.models import projection_mlp
from trainer.models.whitening import IterNorm

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least
from .vicreg import VICRegOptions


@dataclass
class VIbCRegOptions(VICRegOptions):
    """VICReg's options and their checks, with VIbCReg's defaults and IterNorm's two."""
    covariance_weight: float = 200.0   # nu, on the normalised (correlation) off-diagonal term
    projection_dim: int = 4096         # projector output (paper 4096)
    projection_hidden_dim: int = 4096  # projector hidden width (paper 4096)
    iternorm_groups: int = 64          # IterNorm groups (paper 64); must divide projection_dim
    iternorm_iterations: int = 5       # Newton-Schulz iterations T (paper 5)

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, 1, "iternorm_groups", "iternorm_iterations")
        if self.projection_dim % self.iternorm_groups:
            raise ValueError(f"iternorm_groups ({self.iternorm_groups}) must divide projection_dim "
                             f"({self.projection_dim})")


@register
class VIbCReg(Objective):
    key = "vibcreg"
    Options = VIbCRegOptions

    def __init__(self, spec: ObjectiveSpec, options: VIbCRegOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)
        self.projector[-1].register_parameter("bias", None)  # IterNorm centres each feature: a bias would cancel
        self.whitening = IterNorm(options.projection_dim, options.iternorm_groups, options.iternorm_iterations)

    def _project(self, images: torch.Tensor) -> torch.Tensor:
        """Whitened projections of the global batch [N, D] (IterNorm over every process's rows)."""
        return self.whitening(gather_with_grad(self.projector(self.encoder.encode_image(images))))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1, z2 = self._project(batch["view0"]), self._project(batch["view1"])  # one pass per view, as the paper
        o = self.options
        terms = vibcreg(z1, z2, o.invariance_weight, o.variance_weight, o.covariance_weight, o.eps)
        return {"loss": terms.loss, "invariance": terms.invariance.detach(), "variance": terms.variance.detach(),
                "covariance": terms.covariance.detach(), "embedding_std": embedding_std(z1)}
