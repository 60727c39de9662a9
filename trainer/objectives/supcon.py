"""SupCon (Khosla et al. 2020, "Supervised Contrastive Learning").

Two augmented views of each image, an MLP projection head (removed at export: only ``self.encoder`` is
saved), and the L_out supervised contrastive loss: every other view of the same class in the global batch
is a positive, all other views are in the denominator. Features are gathered across processes with
gradient and labels without, so two processes compute the loss of one process on the concatenated batch.
Samples without a label in the shards (label -1) count as classes of their own (SimCLR-style positives:
only their own other view); ``use_labels: false`` makes the whole run the self-supervised variant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import AugmentConfig, TwoViews
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses import supcon
from trainer.models import ModelConfig, projection_mlp

from .base import Objective, ObjectiveSpec, register


@dataclass
class SupConOptions:
    temperature: float = 0.1  # the authors' CIFAR runs
    base_temperature: float = 0.07  # the authors' code rescales the loss by temperature / base_temperature
    projection_dim: int = 128
    projection_hidden_dim: int = 512  # the authors' head: Linear(dim_in, dim_in)-ReLU-Linear(dim_in, 128)
    projection_layers: int = 2
    use_labels: bool = True
    augment: dict = field(default_factory=dict)  # AugmentConfig fields


@register
class SupCon(Objective):
    key = "supcon"
    Options = SupConOptions

    def __init__(self, spec: ObjectiveSpec, options: SupConOptions):
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
        z1, z2 = self.projector(self.encoder.encode_image(views)).chunk(2)
        features = torch.stack([gather_with_grad(z1), gather_with_grad(z2)], dim=1)  # [N_global, 2, D]
        labels = gather_no_grad(batch["label"].to(features.device)) if self.options.use_labels else None
        loss = supcon(features, labels, self.options.temperature, self.options.base_temperature)
        metrics = {"loss": loss}
        if labels is not None:
            # Share of the batch whose class is unknown (label < 0): those anchors only have their own view.
            metrics["unlabelled"] = (labels < 0).float().mean()
        return metrics
