"""LeJEPA (Balestriero & LeCun 2025, "LeJEPA: Provable and Scalable Self-Supervised Learning Without the
Heuristics", arXiv 2511.08544).

What the paper adds: one network (backbone -> 3-layer projector with BN and ReLU) sees V_g global and V_l local
multi-crop views (``trainer.data.multicrop``); every view's projection predicts the mean of the global views'
projections (MSE, no stop-gradient), and SIGReg (Sketched Isotropic Gaussian Regularization) pushes each
view's projections towards an isotropic Gaussian: they are projected on M random unit directions and each 1-D
projection is scored against N(0, 1) by the Epps-Pulley statistic (ECF vs exp(-t^2 / 2), Gaussian-weighted,
trapezoid rule on 17 knots of [0, 3] folded from [-3, 3]), averaged over directions and views
(``trainer.losses.sigreg``). Loss = (1 - lambda) prediction + lambda SIGReg, lambda 0.05. No EMA teacher,
no stop-gradient, no schedules: that is the paper's point.

Implementation choices: the directions are redrawn every step from a CPU generator seeded by the step
(``steps_done``, a buffer, so ``--resume`` continues the same sequence), so every process and every device
type draws the same ones, as the reference code's step-seeded generator. The ECF is a mean over the GLOBAL
batch: each process sums cos / sin over its rows and the sums are all-reduced with autograd (the reference
code all-reduces the ECF), so no process computes the [V, N, M, K] trigonometric tensor of the whole batch;
the prediction term's sum is all-reduced the same way, and 2 processes give the loss and gradients of 1. The
loss runs in float32 (under autocast the projections are cast up: bf16 cosines of large arguments are coarse).
The unregistered base ``SketchedMultiCrop`` here holds what VISReg (``visreg.py``) reuses: the multi-crop views,
the projector, the [V, n, D] projections and the step-seeded directions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.multicrop import (
    MultiCropOptions,
    MultiCropViews,
    accepted_local_size,
    crops_in_order,
    encode_crops,
)
from trainer.data.views import AugmentConfig, view_configs
from trainer.distributed import all_reduce_sum_with_grad, world_size
from trainer.losses.sigreg import epps_pulley_knots, lejepa, random_directions
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least, require_in_range, require_positive


@dataclass
class LeJEPAOptions(MultiCropOptions):
    lambd: float = 0.05                # lambda, SIGReg's share of the loss (paper 0.05; it explores 0.01-0.1)
    num_slices: int = 1024             # M random directions per step (lightly's / the authors' default)
    knots: int = 17                    # quadrature knots on [0, t_max]
    t_max: float = 3.0                 # integration range [-t_max, t_max] of the Epps-Pulley statistic
    projection_dim: int = 64           # projector output (lightly's LeJEPA head; the authors' minimal demo 16-128)
    projection_hidden_dim: int = 2048  # projector hidden width (paper 2048)
    projection_layers: int = 3         # linear layers, BN + ReLU between them (paper 3)
    num_global_crops: int = 2          # V_g (paper 2)
    num_local_crops: int = 8           # V_l (paper 8)

    def __post_init__(self):
        require_in_range(self, 0.0, 1.0, "lambd")
        require_positive(self, "t_max")
        validate_sketch_options(self)
        require_at_least(self, 2, "knots")


def validate_sketch_options(options) -> None:
    """What LeJEPA and VISReg options share: widths, slice count and the multi-crop layout."""
    require_at_least(options, 1, "num_slices", "projection_dim", "projection_hidden_dim", "projection_layers")
    require_at_least(options, 2, "num_global_crops")  # crops_in_order wants global0 and global1
    require_at_least(options, 0, "num_local_crops")
    view_configs(options.augment)  # unknown augmentation fields fail here, clearly


class SketchedMultiCrop(Objective):
    """What LeJEPA and VISReg share (not registered): multi-crop views, the projector, the [V, n, D] projections
    and the step-seeded random directions. Subclasses set ``key`` / ``Options`` and write ``forward``."""

    def __init__(self, spec: ObjectiveSpec, options):
        super().__init__(spec, options)
        self.local_crop_size = accepted_local_size(self.encoder.backbone, spec.image_size, options.local_crop_size,
                                                   self.encoder.config.channels)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # seeds this step's directions

    def views(self) -> MultiCropViews:
        config, o = self.encoder.config, self.options
        return MultiCropViews(config.image_size, self.local_crop_size, config.mean, config.std, o.num_local_crops,
                              AugmentConfig(**o.augment), o.global_crop_scale, o.local_crop_scale, o.num_global_crops)

    def projections(self, batch: dict) -> tuple[torch.Tensor, int]:
        """This process's projections of every crop, [V, n, D] float32 with the globals first, and V_g."""
        crops = crops_in_order(batch)
        z = self.projector(encode_crops(self.encoder.encode_image, crops, self.options.encode_crops_jointly))
        return z.float().view(len(crops), crops[0].shape[0], -1), sum(key.startswith("global") for key in batch)

    def directions(self, like: torch.Tensor) -> torch.Tensor:
        """This step's ``num_slices`` unit directions [D, M], the same on every process, on ``like``'s device."""
        generator = torch.Generator().manual_seed(int(self.steps_done))
        return random_directions(like.shape[-1], self.options.num_slices, generator).to(like.device, like.dtype)

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step + 1)


@register
class LeJEPA(SketchedMultiCrop):
    key = "lejepa"
    Options = LeJEPAOptions

    def __init__(self, spec: ObjectiveSpec, options: LeJEPAOptions):
        super().__init__(spec, options)
        t, weights = epps_pulley_knots(options.knots, options.t_max)
        self.register_buffer("knots", t, persistent=False)  # fixed by the options: not in checkpoints
        self.register_buffer("knot_weights", weights, persistent=False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z, num_global = self.projections(batch)
        terms = lejepa(z, num_global, self.directions(z), self.knots, self.knot_weights, self.options.lambd,
                       reduce_sum=all_reduce_sum_with_grad, total_samples=z.shape[1] * world_size())
        return {"loss": terms.total, "prediction": terms.prediction, "sigreg": terms.sigreg,
                "embedding_std": embedding_std(z[0])}
