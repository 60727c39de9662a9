"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").

One encoder f = backbone -> projector (3 layers: Linear-BN-ReLU twice, then Linear-BN without affine, the
paper's BN on the output) and a bottleneck predictor h (Linear-BN-ReLU-Linear, 2048 -> 512 -> 2048 in the
paper). The loss is the symmetric negative cosine with a stop-gradient on the projection side,
L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 (Algorithm 1); no negatives, no momentum encoder.
Collapse, the failure the stop-gradient prevents (sec. 4.1), is reported as ``embedding_std`` of the
projections z, the quantity of the paper's Figure 2 (middle), times sqrt(D).

Implementation choices: predictions and projections are gathered across processes, so the loss (a batch
mean) is the global batch's on every rank; with global batch norm (the paper's SyncBN) 2 processes equal
1. The paper's option of a fixed (not decayed) learning rate for the predictor (Table 1 note, +0.4%) is
not implemented: the loop applies one schedule to every parameter group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import view_configs
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.noncontrastive import negative_cosine
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least

# The paper's augmentations (MoCo v2's): crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2,
# blur with p 0.5 (ImageNet); the same recipe for both views.
PAPER_AUGMENT = {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                 "blur_prob": 0.5}


@dataclass
class SimSiamOptions:
    projection_dim: int = 2048         # output of projector and predictor (paper 2048)
    projection_hidden_dim: int = 2048  # projector hidden width (paper: the backbone width, 2048 for ResNet-50)
    projection_layers: int = 3         # paper 3 (with BN on every layer, the output one without affine)
    predictor_hidden_dim: int = 512    # the bottleneck (paper 512, a quarter of the output)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields, both views

    def __post_init__(self):
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "predictor_hidden_dim", "projection_layers")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class SimSiam(Objective):
    key = "simsiam"
    Options = SimSiamOptions

    def __init__(self, spec: ObjectiveSpec, options: SimSiamOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe, one augment for both views
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers, last_bn=True)
        self.predictor = projection_mlp(options.projection_dim, options.predictor_hidden_dim, options.projection_dim, 2)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder.encode_image(batch["view0"]))  # one pass per view, as the paper
        z2 = self.projector(self.encoder.encode_image(batch["view1"]))
        p1, p2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        # The stop-gradient: z enters the loss only as a constant target.
        t1, t2 = gather_no_grad(z1.detach()), gather_no_grad(z2.detach())
        loss = 0.5 * negative_cosine(p1, t2) + 0.5 * negative_cosine(p2, t1)
        return {"loss": loss, "embedding_std": embedding_std(z1)}
