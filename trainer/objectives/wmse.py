"""W-MSE (Ermolov et al. 2021, "Whitening for Self-Supervised Representation Learning").

What the paper adds: no negatives and no asymmetric network; instead the embeddings of each view are
whitened (Cholesky: W = L^-1 with L L^T their covariance) within sub-batches of ``w_size`` images, which
scatters them over the unit sphere and forbids collapse, and the loss is the normalised MSE 2 - 2 cos between
the whitened embeddings of every pair of views (``trainer.losses.wmse``). The sub-batches come from a random
permutation of the batch, redrawn ``w_iter`` times per step (the whitening matrix is a noisy estimate; more
iterations average it). CIFAR setting: embedding 64, w_size 128, one hidden projector layer of 1024 with BN,
4 views per image ("W-MSE 4", the paper's best; ``num_views: 2`` is "W-MSE 2"), Adam.

Implementation choices: one encoder pass per view (the authors' code); the projections of all views are
gathered across processes with gradient, and the sub-batches are drawn from the global batch with a
permutation from a generator seeded by (``seed``, step) on every process, so all processes whiten the same
sub-batches and 2 processes compute the loss of 1. The step counter is a buffer, so a resumed run continues the
same permutation sequence. A global batch that is not a multiple of ``w_size`` spreads its remainder over the
sub-batches; one smaller than ``w_size`` is whitened whole. A sub-batch with no more rows than ``projection_dim``
has a singular covariance (the paper's method needs w_size > D): it is then shrunk towards the identity by
at least ``SINGULAR_SHRINK`` (with a warning) instead of failing. Logged: ``embedding_std`` of the first view's
projections and ``whitening_shrink``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from trainer.data.views import ManyViews, view_configs
from trainer.distributed import gather_with_grad
from trainer.losses.wmse import wmse
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import as_number, require_at_least

# The authors' CIFAR augmentations: crop 0.2-1, flip, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.1.
PAPER_AUGMENT = {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.1,
                 "blur_prob": 0.0}
SINGULAR_SHRINK = 0.1  # covariance shrinkage used when a sub-batch has no more rows than dimensions


@dataclass
class WMSEOptions:
    num_views: int = 4                 # views per image (W-MSE 4; 2 for W-MSE 2)
    projection_dim: int = 64           # embedding size (paper: 64 for CIFAR, 128 for larger data sets)
    projection_hidden_dim: int = 1024  # one hidden layer with BN and ReLU (paper 1024)
    projection_layers: int = 2
    w_size: int = 128                  # whitening sub-batch (paper: 128 for CIFAR, 2 x projection_dim)
    w_iter: int = 1                    # permutations (whitening iterations) per step (paper 1 on CIFAR)
    w_eps: float = 0.0                 # covariance shrinkage towards the identity (authors' code: 0)
    seed: int = 0                      # seeds the sub-batch permutations, identically on every process
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields, every view

    def __post_init__(self):
        require_at_least(self, 2, "num_views", "w_size")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers", "w_iter")
        require_at_least(self, 0, "seed")
        if self.w_size <= self.projection_dim:
            raise ValueError(f"w_size must exceed projection_dim for a non-singular covariance (the paper uses "
                             f"2 x projection_dim), got w_size {self.w_size}, projection_dim {self.projection_dim}")
        if not 0.0 <= as_number(self, "w_eps") < 1.0:
            raise ValueError(f"w_eps must be in [0, 1), got {self.w_eps}")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class WMSE(Objective):
    key = "wmse"
    Options = WMSEOptions

    def __init__(self, spec: ObjectiveSpec, options: WMSEOptions):
        super().__init__(spec, options)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)
        # The optimizer step the next forward belongs to: the permutations are a function of it (and of seed).
        self.register_buffer("permutation_step", torch.zeros((), dtype=torch.long))
        self._warned_singular = False

    def views(self) -> ManyViews:
        return self.many_views(self.options.num_views)

    def permutations(self, rows: int) -> list[torch.Tensor]:
        """``w_iter`` permutations of the global batch's rows, the same on every process for a given step."""
        # torch's CPU generator keeps 32 bits of its seed: mix (seed, step) into them.
        generator = torch.Generator().manual_seed((self.options.seed * 2_654_435_761 + int(self.permutation_step))
                                                  % 2**32)
        return [torch.randperm(rows, generator=generator) for _ in range(self.options.w_iter)]

    def _shrink(self, rows: int) -> float:
        smallest = rows // max(1, rows // self.options.w_size)  # the smallest sub-batch (see sub_batches)
        if smallest > self.options.projection_dim:
            return self.options.w_eps
        if not self._warned_singular:
            warnings.warn(f"wmse: sub-batches of {smallest} rows for {self.options.projection_dim} dimensions have a "
                          f"singular covariance; shrinking it by {max(self.options.w_eps, SINGULAR_SHRINK)} (use a "
                          f"global batch of at least w_size = {self.options.w_size})", RuntimeWarning, stacklevel=2)
            self._warned_singular = True
        return max(self.options.w_eps, SINGULAR_SHRINK)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z = torch.stack([self.projector(self.encoder.encode_image(batch[f"view{i}"]))
                         for i in range(self.options.num_views)], dim=1)  # [n, V, D], one pass per view
        z_global = gather_with_grad(z)
        rows = z_global.shape[0]
        shrink = self._shrink(rows)
        permutations = [p.to(z.device) for p in self.permutations(rows)]
        loss = wmse(z_global, permutations, self.options.w_size, shrink)
        return {"loss": loss, "embedding_std": embedding_std(z[:, 0]), "whitening_shrink": loss.new_tensor(shrink)}

    def after_step(self, step: int, total_steps: int) -> None:
        self.permutation_step.fill_(step + 1)
