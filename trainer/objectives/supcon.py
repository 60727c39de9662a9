"""SupCon (Khosla et al. 2020, "Supervised Contrastive Learning").

Two augmented views of each image, an MLP projection head (removed at export: only ``self.encoder`` is
saved), and the L_out supervised contrastive loss: every other view of the same class in the global batch
is a positive, all other views are in the denominator. Features are gathered across processes with
gradient and labels without, so two processes compute the loss of one process on the concatenated batch.
Samples without a label in the shards (label -1) count as classes of their own (SimCLR-style positives:
only their own other view); ``use_labels: false`` makes the whole run the self-supervised variant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.distributed import gather_no_grad
from trainer.losses import supcon

from .base import register
from .two_view import TwoViewObjective, TwoViewOptions


@dataclass
class SupConOptions(TwoViewOptions):
    temperature: float = 0.1  # the authors' CIFAR runs
    base_temperature: float = 0.07  # the authors' code rescales the loss by temperature / base_temperature
    projection_hidden_dim: int = 512  # the authors' head: Linear(dim_in, dim_in)-ReLU-Linear(dim_in, 128)
    use_labels: bool = True


@register
class SupCon(TwoViewObjective):
    key = "supcon"
    Options = SupConOptions

    def loss_from_projections(self, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        features = torch.stack([z1, z2], dim=1)  # [N_global, 2, D]
        labels = gather_no_grad(batch["label"].to(features.device)) if self.options.use_labels else None
        loss = supcon(features, labels, self.options.temperature, self.options.base_temperature)
        metrics = {"loss": loss}
        if labels is not None:
            # Share of the batch whose class is unknown (label < 0): those anchors only have their own view.
            metrics["unlabelled"] = (labels < 0).float().mean()
        return metrics
