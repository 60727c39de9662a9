"""MACL (Huang et al. 2023, "Model-Aware Contrastive Learning: Towards Escaping the Dilemmas").

SimCLR's setting (two augmented views, 2-layer MLP projection head dropped at export, NT-Xent's 2N - 2
negatives per anchor over the global batch) with the paper's model-aware loss (``trainer.losses.macl``): the
temperature tracks the alignment magnitude A of the batch's positive pairs, tau = tau_0 (1 + alpha (A - A_0)),
so the uniformity-tolerance trade-off follows training instead of being fixed, and each anchor's loss is
reweighted by 1 / (1 - P+) to cancel the gradient-shrinking factor of small batches.

Implementation choices: projections are gathered from all processes with gradient, so A, the temperature and
the negatives are the global batch's (2 processes equal 1); the negatives are SimCLR's 2N - 2 of both views
(as in lightly's MACLLoss; the authors' snippet contrasts one view against the other only). The temperature in
use is logged as ``temperature`` and A as ``alignment``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.views import view_configs
from trainer.losses.macl import macl, model_aware_temperature

from .base import register
from .diagnostics import embedding_std
from .options import as_number, require_at_least, require_in_range, require_positive
from .two_view import TwoViewObjective, TwoViewOptions


@dataclass
class MACLOptions(TwoViewOptions):
    temperature: float = 0.1          # tau_0, the base temperature (paper 0.1)
    alpha: float = 0.5                # how strongly tau follows the alignment, in [0, 1] (paper 0.5)
    alignment_threshold: float = 0.0  # A_0, the alignment at which tau = tau_0, in [-1, 1] (paper 0)

    def __post_init__(self) -> None:
        require_positive(self, "temperature")
        require_in_range(self, 0.0, 1.0, "alpha")
        if not -1.0 <= as_number(self, "alignment_threshold") <= 1.0:
            raise ValueError(f"alignment_threshold must be in [-1, 1] (a cosine), got {self.alignment_threshold}")
        if self.alpha * (1.0 + self.alignment_threshold) >= 1.0:  # tau at A = -1 would be <= 0
            raise ValueError(f"alpha * (1 + alignment_threshold) must be < 1 so that the temperature stays > 0, "
                             f"got alpha {self.alpha}, alignment_threshold {self.alignment_threshold}")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class MACL(TwoViewObjective):
    key = "macl"
    Options = MACLOptions

    def loss_from_projections(self, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        options = self.options
        loss = macl(z1, z2, options.temperature, options.alpha, options.alignment_threshold)
        with torch.no_grad():  # A of this step, as the loss computes it (the mean positive cosine)
            alignment = (F.normalize(z1.detach(), dim=1) * F.normalize(z2.detach(), dim=1)).sum(dim=1).mean()
            temperature = model_aware_temperature(alignment, options.temperature, options.alpha,
                                                  options.alignment_threshold)
        return {"loss": loss, "alignment": alignment, "temperature": temperature, "embedding_std": embedding_std(z1)}
