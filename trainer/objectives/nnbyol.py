"""NNBYOL (solo-learn's NNBYOL: the nearest-neighbour positives of Dwibedi et al. 2021, "With a Little Help from
My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations", applied to BYOL).

BYOL (``trainer.objectives.byol``: online backbone + projector + predictor, EMA target with the cosine
momentum schedule, symmetric 2 - 2 cos loss) whose target is replaced by its nearest neighbour: the target
projection of each view, L2-normalised, looks up its cosine nearest neighbour in a support set (a FIFO queue of
earlier target projections of view 1, 65,536 in solo-learn) and the online prediction of the other view
regresses that neighbour: L = byol_loss(p1, NN(t2)) + byol_loss(p2, NN(t1)).

Implementation choices: the look-up and the queue use the target projections of the global batch (gathered),
so every process holds the same queue; the queue takes a step's projections after its optimizer step (that
step's look-ups see the queue before it). Until it holds a projection, a target's neighbour is itself: the
first step is plain BYOL. ``nn_similarity`` logs the mean cosine between a target and its neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.distributed import gather_with_grad
from trainer.losses.noncontrastive import byol_loss

from .base import ObjectiveSpec, register
from .byol import BYOL, BYOLOptions
from .diagnostics import embedding_std
from .nnclr import neighbour_similarity
from .options import require_at_least
from .support_set import SupportSet


@dataclass
class NNBYOLOptions(BYOLOptions):
    queue_size: int = 65536  # support set size (solo-learn 65,536)

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, 1, "queue_size")


@register
class NNBYOL(BYOL):
    key = "nnbyol"
    Options = NNBYOLOptions

    def __init__(self, spec: ObjectiveSpec, options: NNBYOLOptions):
        super().__init__(spec, options)
        self.support_set = SupportSet(options.queue_size, options.projection_dim)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x1, x2 = batch["view0"], batch["view1"]
        t1, t2 = self._target(x1), self._target(x2)  # global target projections, no gradient
        nn1, nn2 = self.support_set.nearest(t1), self.support_set.nearest(t2)
        z1 = self.projector(self.encoder.encode_image(x1))
        z2 = self.projector(self.encoder.encode_image(x2))
        p1, p2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        loss = byol_loss(p1, nn2) + byol_loss(p2, nn1)
        if self.training:
            self.support_set.stage(t1)
        return {"loss": loss, "embedding_std": embedding_std(z1), "nn_similarity": neighbour_similarity(t1, nn1)}

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)  # the EMA update of the target
        self.support_set.flush()
