"""FroSSL (Skean et al. 2024, "FroSSL: Frobenius Norm Minimization for Self-Supervised Learning").

What the paper adds: for each of V views, the projections are L2-normalised per dimension over the batch and
their covariance, divided by its trace, is pushed towards a flat spectrum by minimising the log of its
squared Frobenius norm (the negative order-2 Renyi entropy of its eigenvalues: no eigendecomposition, so it
scales to many views); an invariance term pulls every view's normalised embeddings towards their mean over
views. Loss = sum_v log ||C_v||_F^2 + lambda sum_v ||Z_v - Z_mean||_F^2 / N, lambda = 1
(``trainer.losses.coding_rate.frossl``). Projector: Linear-BN-ReLU twice, then Linear (2048-2048-1024 on
CIFAR in the authors' solo-learn configuration).

Implementation choices: one encoder pass per view (solo-learn's); the projections of all views are gathered
across processes with gradient, so the per-dimension normalisation, the covariances and the invariance are
those of the global batch and 2 processes equal 1. The invariance weighting is the authors' solo-learn code's
(V * D * MSE over all views = sum_v ||Z_v - Z_mean||_F^2 / N); lightly's FroSSLLoss weighs it V times more.
Logged: ``frobenius_entropy`` (the regulariser summed over views), ``invariance`` and ``embedding_std`` of the
first view's projections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import ManyViews, view_configs
from trainer.distributed import gather_with_grad
from trainer.losses.coding_rate import frobenius_entropy, frossl, view_invariance
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least, require_non_negative

# The authors' CIFAR augmentations (solo-learn "symmetric_weak"): crop 0.08-1, flip, jitter (0.4, 0.4, 0.4, 0.1)
# with p 0.8, grayscale 0.2; no blur or solarisation.
PAPER_AUGMENT = {"crop_scale": (0.08, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                 "blur_prob": 0.0, "solarize_prob": 0.0}


@dataclass
class FroSSLOptions:
    num_views: int = 2                 # views per image (2 on CIFAR; the loss takes any V >= 2)
    invariance_weight: float = 1.0     # lambda on the invariance term (paper 1)
    projection_dim: int = 1024         # authors' CIFAR projector 2048-2048-1024
    projection_hidden_dim: int = 2048
    projection_layers: int = 3
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields, every view

    def __post_init__(self):
        require_at_least(self, 2, "num_views")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        require_non_negative(self, "invariance_weight")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class FroSSL(Objective):
    key = "frossl"
    Options = FroSSLOptions

    def __init__(self, spec: ObjectiveSpec, options: FroSSLOptions):
        super().__init__(spec, options)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)

    def views(self) -> ManyViews:
        return self.many_views(self.options.num_views)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z = torch.stack([self.projector(self.encoder.encode_image(batch[f"view{i}"]))
                         for i in range(self.options.num_views)], dim=1)  # [n, V, D], one pass per view
        z_global = gather_with_grad(z)
        loss = frossl(z_global, self.options.invariance_weight)
        with torch.no_grad():  # the two terms again, for the log (a D x D product per view: cheap)
            entropy, invariance = frobenius_entropy(z_global).sum(), view_invariance(z_global)
        return {"loss": loss, "frobenius_entropy": entropy, "invariance": invariance,
                "embedding_std": embedding_std(z[:, 0])}
