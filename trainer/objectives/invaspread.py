"""InvaSpread (Ye et al. 2019, "Unsupervised Embedding Learning via Invariant and Spreading Instance Feature").

One encoder (a Siamese pair sharing weights) embeds each image of the batch and an augmented copy of it into
L2-normalised 128-d features; the batch itself supplies every negative (no memory bank). The loss is the
paper's instance-wise softmax embedding (``trainer.losses.invaspread.invariance_spreading_loss``):

    L = -(1/N) [ Σ_i log P(i | x̂_i) + Σ_i Σ_{j≠i} log(1 - P(i | x_j)) ],
    P(i | x̂_i) = exp(f_i·f̂_i/τ) / Σ_k exp(f_k·f̂_i/τ),   P(i | x_j) = exp(f_i·f_j/τ) / Σ_k exp(f_k·f_j/τ),

with k over the batch's originals and τ = 0.1. Features are gathered from every process with gradient, so
N is the global batch, as on one device. As in the authors' code both images of a pair are random
augmentations of the source (``view0`` plays x_i, ``view1`` x̂_i). The 128-d feature (a linear layer after
the backbone, ``EmbeddingModel.image_projection``) is the exported embedding, the paper's kNN feature.
``loss`` may switch to another InfoNCE-family loss with x̂_i as query, f_i as positive and f_k (k ≠ i) as
negatives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from trainer.distributed import gather_with_grad
from trainer.losses.invaspread import invariance_spreading_loss
from trainer.losses.nce_family import contrastive_loss_from_similarities, similarities
from trainer.models import ModelConfig

from .base import Objective, ObjectiveSpec, default_model_config, register
from .options import InfoNCEOptions


@dataclass
class InvaSpreadOptions(InfoNCEOptions):
    projection_dim: int = 128   # the paper's 128-d normalised embedding (exported: the model's image_projection)
    temperature: float = 0.1    # tau
    loss: str = "invaspread"    # invaspread (paper) | infonce | nce | flatnce | debiased | hcl
    augment: dict = field(default_factory=lambda: {  # the paper's CIFAR augmentation (crop, jitter, grey, flip)
        "crop_scale": (0.2, 1.0), "jitter_strength": 0.5, "jitter_prob": 1.0, "grayscale_prob": 0.2})

    EXTRA_LOSSES: ClassVar[tuple[str, ...]] = ("invaspread",)
    ALIASES: ClassVar[dict[str, str]] = {"feature_dim": "projection_dim"}


@register
class InvaSpread(Objective):
    key = "invaspread"
    Options = InvaSpreadOptions

    def model_config(self, spec: ObjectiveSpec, options: InvaSpreadOptions) -> ModelConfig:
        return default_model_config(spec, image_projection=options.projection_dim)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        pairs = torch.cat([batch["view0"], batch["view1"]])  # one pass: batch norm sees originals and copies
        features = F.normalize(self.encoder.encode_image(pairs), dim=1)
        local_f, local_f_hat = features.chunk(2)
        f, f_hat = gather_with_grad(local_f), gather_with_grad(local_f_hat)
        kind = self.options.loss
        if kind == "invaspread":
            loss = invariance_spreading_loss(f, f_hat, self.options.temperature)
        else:
            positive, negatives = similarities(f_hat, f)  # query x̂_i; positive f_i; negatives f_k, k != i
            loss = contrastive_loss_from_similarities(kind, positive, negatives, self.options.temperature,
                                                      **self.options.loss_options())
        return {"loss": loss, "positive_cos": (f * f_hat).sum(dim=1).mean().detach()}
