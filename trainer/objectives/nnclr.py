"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of
Visual Representations").

What the paper adds to SimCLR: the positive of a sample is not its other view but the nearest neighbour of
one view's projection in a support set, a FIFO queue (98,304 in the paper) of earlier projections, so
positives bring in semantic variation no augmentation makes. Backbone -> projector (3 layers, BN on every
layer, 2048 -> 256) -> predictor (2 layers, 4096 hidden). For view 1's projection z1 the neighbour NN(z1)
(cosine, no gradient) is the positive of view 2's prediction p2, with the other rows' predictions as its
negatives (eq. 2) plus the transposed term of sec. 3.2 (the prediction as anchor, the other rows' neighbours
as negatives); the same for (NN(z2), p1), averaged. tau 0.1. The support set takes view 1's projections.

Implementation choices: predictions are gathered across processes with gradient and projections without, so
the look-up, the negatives and the queue update span the global batch and every process holds the same queue
(2 processes equal 1); the queue is updated after the optimizer step with that step's projections (the step's
own look-ups see the queue before it, as in the authors' and solo-learn's code). Until the queue holds a
projection (the first step) a row's neighbour is the row itself (``SupportSet``). The output BN of the
projector is without affine parameters (``projection_mlp(last_bn=True)``). The ``loss`` option swaps InfoNCE
for another loss of the family over the same positives and negatives. Logged: ``embedding_std`` of view 1's
projections and ``nn_similarity``, the mean cosine between a projection and its neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.views import view_configs
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.all4one import neighbour_contrast
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .byol import PAPER_AUGMENT, PAPER_SECOND_VIEW
from .diagnostics import embedding_std
from .options import InfoNCEOptions, require_at_least
from .support_set import SupportSet


@dataclass
class NNCLROptions(InfoNCEOptions):
    temperature: float = 0.1           # tau (paper 0.1)
    queue_size: int = 98304            # support set size (paper 98,304)
    projection_dim: int = 256          # projector and predictor output (paper 256)
    projection_hidden_dim: int = 2048  # projector hidden width (paper 2048)
    projection_layers: int = 3         # paper 3, BN on every layer
    predictor_hidden_dim: int = 4096   # predictor hidden width (paper 4096)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0: BYOL's augmentations (paper)
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, 1, "queue_size", "projection_dim", "projection_hidden_dim", "projection_layers",
                         "predictor_hidden_dim")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


def neighbour_similarity(z: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Mean cosine between each row of ``z`` and its (unit-norm) neighbour: 1.0 while the neighbour is the row."""
    return (F.normalize(z.detach().float(), dim=1) * neighbours.float()).sum(dim=1).mean()


@register
class NNCLR(Objective):
    key = "nnclr"
    Options = NNCLROptions

    def __init__(self, spec: ObjectiveSpec, options: NNCLROptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers, last_bn=True)
        self.predictor = projection_mlp(options.projection_dim, options.predictor_hidden_dim, options.projection_dim, 2)
        self.support_set = SupportSet(options.queue_size, options.projection_dim)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder.encode_image(batch["view0"]))  # one pass per view, as the paper
        z2 = self.projector(self.encoder.encode_image(batch["view1"]))
        p1, p2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        t1, t2 = gather_no_grad(z1.detach()), gather_no_grad(z2.detach())
        nn1, nn2 = self.support_set.nearest(t1), self.support_set.nearest(t2)
        o = self.options
        loss = 0.5 * (neighbour_contrast(nn1, p2, o.temperature, kind=o.loss, **o.loss_options())
                      + neighbour_contrast(nn2, p1, o.temperature, kind=o.loss, **o.loss_options()))
        if self.training:
            self.support_set.stage(t1)
        return {"loss": loss, "embedding_std": embedding_std(z1), "nn_similarity": neighbour_similarity(t1, nn1)}

    def after_step(self, step: int, total_steps: int) -> None:
        self.support_set.flush()
