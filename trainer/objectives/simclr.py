"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two augmented views of each image, a 2-layer MLP projection head (removed at export), and NT-Xent over
the global batch: embeddings are gathered from all processes with gradient, so each anchor sees
2(N_global - 1) negatives exactly as on one device holding the whole batch.

The ``loss`` option swaps NT-Xent for another loss of the InfoNCE family (``trainer.losses.nce_family``:
nce, flatnce, debiased (tau_plus), hcl (tau_plus, beta)) over the same per-anchor positive and 2N-2
negatives; the default ``infonce`` is NT-Xent itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.losses import contrastive_loss_from_similarities, nt_xent, two_view_similarities

from .base import register
from .diagnostics import embedding_std
from .options import InfoNCEOptions
from .two_view import TwoViewObjective, TwoViewOptions


@dataclass
class SimCLROptions(InfoNCEOptions, TwoViewOptions):
    # tau_plus 0.1 (Chuang et al. on CIFAR-10), beta 1 (Robinson et al.: 0.5-1); nce's Pn defaults to 1/(2N-1).
    temperature: float = 0.5


@register
class SimCLR(TwoViewObjective):
    key = "simclr"
    Options = SimCLROptions

    def loss_from_projections(self, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        if self.options.loss == "infonce":
            loss = nt_xent(z1, z2, self.options.temperature)
        else:
            positive, negatives = two_view_similarities(z1, z2)
            loss = contrastive_loss_from_similarities(self.options.loss, positive, negatives, self.options.temperature,
                                                      **self.options.loss_options())
        return {"loss": loss, "embedding_std": embedding_std(z1)}

