"""The common shape of two-view objectives: encoder + MLP projection head (dropped at export) on two
augmented views of each image, projections gathered across processes with gradient.

SimCLR, SupCon and alignment/uniformity differ only in the loss they put on those projections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.distributed import gather_with_grad
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec


@dataclass
class TwoViewOptions:
    projection_dim: int = 128
    projection_hidden_dim: int = 2048
    projection_layers: int = 2
    augment: dict = field(default_factory=dict)  # AugmentConfig fields
    # True: one encoder pass over both views, so BN statistics span 2N images (SimCLR's TF code).
    # False: one pass per view (lightly's and most PyTorch code), the default: faster on CPU at large batches,
    # where a 2N-image pass falls out of cache (tests/benchmarks/RESULTS_training_speed.md, "Design measurements").
    encode_views_jointly: bool = False


class TwoViewObjective(Objective):
    """Subclasses set ``key`` and ``Options`` (a ``TwoViewOptions``) and write ``loss_from_projections``.

    ``forward`` is ``embed`` (this process's projections) then ``loss_from_embeddings`` (gather, loss), the split
    ``trainer.grad_cache`` uses to train a large batch in micro-batches."""

    def __init__(self, spec: ObjectiveSpec, options: TwoViewOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe from options.augment
        self.projector = projection_mlp(
            self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim, options.projection_layers
        )

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """This process's projections ``z1``, ``z2`` [n, projection_dim] of view0 and view1."""
        if self.options.encode_views_jointly:
            views = torch.cat([batch["view0"], batch["view1"]])  # one pass: BN sees both views together
            z1, z2 = self.projector(self.encoder.encode_image(views)).chunk(2)
        else:
            z1 = self.projector(self.encoder.encode_image(batch["view0"]))
            z2 = self.projector(self.encoder.encode_image(batch["view1"]))
        return {"z1": z1, "z2": z2}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_projections(gather_with_grad(embeddings["z1"]), gather_with_grad(embeddings["z2"]), batch)

    def loss_from_projections(self, z1: torch.Tensor, z2: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The loss on projections [N_global, projection_dim] of view0 and view1 gathered over processes."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(batch), batch)
