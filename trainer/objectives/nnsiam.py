"""NNSiam (solo-learn's NNSiam: the nearest-neighbour positives of Dwibedi et al. 2021, "With a Little Help from
My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations", applied to SimSiam).

SimSiam (``trainer.objectives.simsiam``: 3-layer projector with BN on the output, predictor, stop-gradient,
symmetric negative cosine) whose target is replaced by its nearest neighbour: each view's projection,
L2-normalised, looks up its cosine nearest neighbour in a support set (a FIFO queue of earlier projections of
view 1, 65,536 in solo-learn) and the prediction of the other view is pulled towards that neighbour:
L = D(p1, NN(z2)) / 2 + D(p2, NN(z1)) / 2. The neighbour is a constant, so it is also the stop-gradient.
solo-learn's CIFAR setting widens the predictor to 4096 (SimSiam: a 512 bottleneck); that is the default here.

Implementation choices: the look-up and the queue use the projections of the global batch (gathered), so every
process holds the same queue; the queue takes a step's projections after its optimizer step (that step's
look-ups see the queue before it). Until it holds a projection, a projection's neighbour is itself: the first
step is plain SimSiam. ``nn_similarity`` logs the mean cosine between a projection and its neighbour.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.noncontrastive import negative_cosine

from .base import ObjectiveSpec, register
from .diagnostics import embedding_std
from .nnclr import neighbour_similarity
from .options import require_at_least
from .simsiam import SimSiam, SimSiamOptions
from .support_set import SupportSet


@dataclass
class NNSiamOptions(SimSiamOptions):
    predictor_hidden_dim: int = 4096  # solo-learn's NNSiam (SimSiam's paper: 512)
    queue_size: int = 65536           # support set size (solo-learn 65,536)

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, 1, "queue_size")


@register
class NNSiam(SimSiam):
    key = "nnsiam"
    Options = NNSiamOptions

    def __init__(self, spec: ObjectiveSpec, options: NNSiamOptions):
        super().__init__(spec, options)
        self.support_set = SupportSet(options.queue_size, options.projection_dim)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.encoder.encode_image(batch["view0"]))  # one pass per view, as the paper
        z2 = self.projector(self.encoder.encode_image(batch["view1"]))
        p1, p2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        t1, t2 = gather_no_grad(z1.detach()), gather_no_grad(z2.detach())
        nn1, nn2 = self.support_set.nearest(t1), self.support_set.nearest(t2)
        loss = 0.5 * negative_cosine(p1, nn2) + 0.5 * negative_cosine(p2, nn1)
        if self.training:
            self.support_set.stage(t1)
        return {"loss": loss, "embedding_std": embedding_std(z1), "nn_similarity": neighbour_similarity(t1, nn1)}

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        self.support_set.flush()
