"""FastSiam (Pototzky et al. 2022, "FastSiam: Resource-Efficient Self-supervised Learning on a Single GPU").

SimSiam (``trainer.objectives.simsiam``: its projector, bottleneck predictor, stop-gradient and negative cosine)
with K = 4 augmented views of each image instead of 2. What the paper adds: the target of view i is the mean of the
other K - 1 views' (stop-gradient) projections, a less noisy target than one view, which lets small batches on one
GPU train stably; the loss averages the negative cosine of every view's prediction to its target
(``trainer.losses.fastsiam``). Views come from ``ManyViews`` (``view0`` ... ``view{K-1}``, one recipe).

Implementation choices (as SimSiam's): one backbone pass per view; predictions and projections are gathered across
processes, so the loss is the global batch's and, with global batch norm, 2 processes equal 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.views import ManyViews, stack_views
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.fastsiam import fastsiam_loss

from .base import register
from .diagnostics import embedding_std
from .options import require_at_least
from .simsiam import SimSiam, SimSiamOptions


@dataclass
class FastSiamOptions(SimSiamOptions):
    num_views: int = 4  # K views per image (paper 4); the target of each is the mean of the other K - 1

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, 3, "num_views")  # with 2 views the "mean of the others" is SimSiam itself


@register
class FastSiam(SimSiam):
    key = "fastsiam"
    Options = FastSiamOptions

    def views(self) -> ManyViews:
        return self.many_views(self.options.num_views)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = stack_views(batch, self.options.num_views)  # [N, K, C, H, W]
        z = [self.projector(self.encoder.encode_image(images[:, i])) for i in range(images.shape[1])]
        predictions = torch.stack([gather_with_grad(self.predictor(projection)) for projection in z])
        projections = torch.stack([gather_no_grad(projection.detach()) for projection in z])
        loss = fastsiam_loss(predictions, projections)
        return {"loss": loss, "embedding_std": embedding_std(z[0])}
