"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning").

Online network: backbone -> projector (Linear-BN-ReLU-Linear, 4096 -> 256 in the paper) -> predictor (the
same MLP shape). Target network: the momentum copy of backbone + projector, run under no_grad, updated
after each optimizer step by theta_t <- m theta_t + (1 - m) theta_o with m on a cosine schedule from
``momentum`` (paper 0.996) to 1.0, a pure function of the step (``momentum_at(step + 1, ...)``: after
step s the next forward is iteration s + 1). Loss: the normalised MSE 2 - 2 cos(p, z) between the online
prediction of one view and the target projection of the other, symmetrised (L + L~, sec. 3.1).
The paper's asymmetric augmentations: view0 blur 1.0 / solarize 0.0, view1 blur 0.1 / solarize 0.2
(``augment`` for view0, ``second_view_augment`` laid over it for view1).

Implementation choices: predictions and target projections are gathered across processes, so the loss
(the batch mean) is the global batch's on every rank; with global batch norm (the paper's cross-replica BN)
2 processes equal 1. The target network keeps its own BN running statistics (EMA covers parameters only),
and everything it holds is a module parameter or buffer, so checkpoints and --resume carry it. Collapse
is reported as ``embedding_std`` of the online projections.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import view_configs
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.noncontrastive import byol_loss
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import require_at_least, require_momentum_schedule

# The paper's image augmentations (appendix B): crop 0.08-1, flip, jitter (0.4, 0.4, 0.2, 0.1) with p 0.8
# (here the SimCLR factors at strength 0.5: saturation 0.4), grayscale 0.2, and the asymmetric blur/solarize.
PAPER_AUGMENT = {"crop_scale": (0.08, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                 "blur_prob": 1.0, "solarize_prob": 0.0}
PAPER_SECOND_VIEW = {"blur_prob": 0.1, "solarize_prob": 0.2}


@dataclass
class BYOLOptions:
    momentum: float = 0.996            # tau_base of the cosine schedule (paper 0.996)
    final_momentum: float = 1.0        # its end
    projection_dim: int = 256          # projector and predictor output
    projection_hidden_dim: int = 4096  # projector hidden width (paper 4096)
    predictor_hidden_dim: int = 4096   # predictor hidden width (paper 4096)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0's AugmentConfig fields
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        require_momentum_schedule(self)
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "predictor_hidden_dim")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class BYOL(Objective):
    key = "byol"
    Options = BYOLOptions

    def __init__(self, spec: ObjectiveSpec, options: BYOLOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim, 2)
        self.predictor = projection_mlp(options.projection_dim, options.predictor_hidden_dim, options.projection_dim, 2)
        # Deep copies draw no random numbers: every process builds the same target network.
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)

    @torch.no_grad()
    def _target(self, images: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(self.target_projector(self.target_encoder.encode_image(images)))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x1, x2 = batch["view0"], batch["view1"]
        # Targets first: their activations are freed before the online graph is built (lower peak memory).
        t1, t2 = self._target(x1), self._target(x2)
        z1 = self.projector(self.encoder.encode_image(x1))  # one pass per view, as the paper
        z2 = self.projector(self.encoder.encode_image(x2))
        p1, p2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "embedding_std": embedding_std(z1)}

    def after_step(self, step: int, total_steps: int) -> None:
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)
