"""Alignment + uniformity (Wang & Isola 2020, "Understanding Contrastive Representation Learning through
Alignment and Uniformity on the Hypersphere").

Trains on two augmented views with the paper's direct objective
    L = w_align * L_align(alpha) + w_uniform * (L_uniform(z1; t) + L_uniform(z2; t)) / 2
on L2-normalised projections (the paper's uniformity is taken within each view's batch, as in the authors'
code). Both terms are also logged as metrics ("align", "uniform"). Projections are gathered across processes
with gradient, so uniformity sees the global batch and two processes equal one on the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.losses import alignment, uniformity

from .base import register
from .two_view import TwoViewObjective, TwoViewOptions


@dataclass
class AlignUniformOptions(TwoViewOptions):
    alpha: float = 2.0  # paper's default
    t: float = 2.0  # paper's default
    align_weight: float = 1.0  # the authors' STL-10 defaults: weights 1 and 1, alpha 2, t 2
    uniform_weight: float = 1.0
    projection_hidden_dim: int = 512


@register
class AlignUniform(TwoViewObjective):
    key = "align_uniform"
    Options = AlignUniformOptions

    def loss_from_projections(self, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        align = alignment(z1, z2, self.options.alpha)
        uniform = 0.5 * (uniformity(z1, self.options.t) + uniformity(z2, self.options.t))
        loss = self.options.align_weight * align + self.options.uniform_weight * uniform
        return {"loss": loss, "align": align.detach(), "uniform": uniform.detach()}
