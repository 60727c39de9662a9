"""TiCo (Zhu, Moraes, Karakulak, Sobol, Canziani & LeCun 2022, "TiCo: Transformation Invariance and Covariance
Contrast for Self-Supervised Visual Representation Learning").

What the paper adds to a two-view joint-embedding setup: a covariance matrix C of the L2-normalised online
embeddings kept as an exponential moving average over steps, C_t = beta C_{t-1} + (1 - beta) Z^T Z / N
(beta 0.9), and the loss -mean cos(z, z') + rho mean(z^T C_t z) (rho 8): the second term pushes each embedding
away from the directions the recent batches occupy, a contrast against an implicit memory of unlimited size
(``trainer.losses.tico``). Network: backbone -> projector (Linear-BN-ReLU-Linear, 4096 -> 256); the other
view goes through a momentum copy of backbone + projector (cosine schedule 0.99 -> 1, as the lightly example that
follows the authors), BYOL's augmentations.

Implementation choices: C is a registered buffer, so checkpoints and --resume carry it. It is the GLOBAL batch's:
the online embeddings are gathered with gradient and the target embeddings without, so every process computes
the same loss and the same C_t (2 processes equal 1). C_t is computed in ``forward`` and stored in
``after_step``, once per optimizer step. The paper's names are kept (beta: the EMA coefficient; rho: the weight).
One direction (online view0 against target view1), as the reference implementations. Collapse is reported as
``embedding_std`` of the online embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import view_configs
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.tico import tico
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .byol import PAPER_AUGMENT, PAPER_SECOND_VIEW
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import as_number, require_at_least, require_momentum_schedule, require_non_negative


@dataclass
class TiCoOptions:
    rho: float = 8.0                   # weight of the covariance-contrast term (paper 8)
    beta: float = 0.9                  # EMA coefficient of the covariance C (paper 0.9), in [0, 1)
    momentum: float = 0.99             # start of the target network's cosine momentum schedule
    final_momentum: float = 1.0        # its end
    projection_dim: int = 256          # projector output (paper 256)
    projection_hidden_dim: int = 4096  # projector hidden width (paper 4096)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0's AugmentConfig fields
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        require_non_negative(self, "rho")
        if not 0.0 <= as_number(self, "beta") < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        require_momentum_schedule(self)
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class TiCo(Objective):
    key = "tico"
    Options = TiCoOptions

    def __init__(self, spec: ObjectiveSpec, options: TiCoOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        2)
        # Deep copies draw no random numbers: every process builds the same target network.
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)
        self.register_buffer("covariance", torch.zeros(options.projection_dim, options.projection_dim))
        self._pending: torch.Tensor | None = None  # this step's C_t, stored in after_step

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # target first: its activations are freed before the online graph is built
            target = gather_no_grad(self.target_projector(self.target_encoder.encode_image(batch["view1"])))
        online = self.projector(self.encoder.encode_image(batch["view0"]))
        terms = tico(gather_with_grad(online), target, self.covariance, self.options.rho, self.options.beta)
        self._pending = terms.new_covariance
        return {"loss": terms.loss, "invariance": terms.invariance.detach(), "covariance": terms.covariance.detach(),
                "embedding_std": embedding_std(online)}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.covariance.copy_(pending.to(self.covariance.dtype))
        # After step s the next forward is iteration s + 1 (the schedule of BYOL / MoCo v3).
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)
