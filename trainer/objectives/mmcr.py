"""MMCR (Yerxa et al. 2023, "Learning Efficient Coding of Natural Images with Maximum Manifold Capacity
Representations").

What the paper adds: k augmented views of every image (40 in its CIFAR runs) embedded by backbone ->
projector (Linear-BN-ReLU-Linear, 512 -> 128 on CIFAR, both linear layers without bias), L2-normalised, and
averaged per image into a centroid; the loss is the negative nuclear norm of the N x D matrix of centroids,
plus lambda times the mean nuclear norm of each image's own k x D view matrix (lambda = 0 in the paper's
runs, so the local term is skipped). Maximising ||C||_* pulls each image's views together (long centroids)
while spreading the images over many directions, with no negatives and no momentum network (the ImageNet
variant's momentum encoder is not part of the CIFAR recipe this follows).

Implementation choices: all k views pass through the encoder in one batch (the authors' code), each image's
views together; the projections [n, k, D] are gathered across processes with gradient, so the
centroid matrix and its nuclear norm are those of the global batch and 2 processes equal 1. Logged:
``centroid_nuclear_norm`` and ``embedding_std`` of the first view's projections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.views import ManyViews, stack_views, view_configs
from trainer.distributed import gather_with_grad
from trainer.losses.mmcr import mmcr, nuclear_norm
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least, require_non_negative

# The authors' CIFAR augmentations: RandomResizedCrop(32) (scale 0.08-1), flip, jitter (0.4, 0.4, 0.4, 0.1)
# with p 0.8 (SimCLR's factors at strength 0.5), grayscale 0.2; no blur.
PAPER_AUGMENT = {"crop_scale": (0.08, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                 "blur_prob": 0.0}


@dataclass
class MMCROptions:
    num_views: int = 40                # k augmented views per image (paper's CIFAR runs: 40)
    lambd: float = 0.0                 # weight of the mean per-image nuclear norm (paper: 0)
    projection_dim: int = 128          # paper's CIFAR projector 512 -> 128
    projection_hidden_dim: int = 512
    projection_layers: int = 2
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields, every view

    def __post_init__(self):
        require_at_least(self, 2, "num_views")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        require_non_negative(self, "lambd")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class MMCR(Objective):
    key = "mmcr"
    Options = MMCROptions

    def __init__(self, spec: ObjectiveSpec, options: MMCROptions):
        super().__init__(spec, options)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)
        # The authors' projector has no biases; the hidden layers have none already (BN follows them).
        self.projector[-1].register_parameter("bias", None)

    def views(self) -> ManyViews:
        return self.many_views(self.options.num_views)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = stack_views(batch, self.options.num_views)  # [n, k, C, H, W]
        n, k = images.shape[:2]
        z = self.projector(self.encoder.encode_image(images.flatten(0, 1))).view(n, k, -1)
        z_global = gather_with_grad(z)
        loss = mmcr(z_global, self.options.lambd)
        with torch.no_grad():
            centroid_norm = nuclear_norm(F.normalize(z_global.float(), dim=-1).mean(dim=1))
        return {"loss": loss, "centroid_nuclear_norm": centroid_norm, "embedding_std": embedding_std(z[:, 0])}
