"""SMoG (Pang et al. 2022, "Unsupervised Visual Representation Learning by Synchronous Momentum Grouping").

A BYOL-style pair of networks (online: backbone -> projector with BN on its output -> predictor; target: the EMA
copy of backbone + projector) whose contrastive unit is a group, not an instance. What the paper adds:
K group features (3000 on ImageNet) that evolve with the representation in the same iteration ("synchronous"):
every target feature of the batch is assigned to its nearest group (cosine), each group moves by momentum to the
mean of its assigned features, g <- beta g + (1 - beta) mean (beta 0.99), and the online prediction of each view
is contrasted against all groups with a cross-entropy to the group of the OTHER view (temperature 0.1),
symmetrised. The groups are re-initialised periodically by k-means over a memory of recent target features
(``reset_every_steps``; lightly's example, after the paper's Table 7b, also resets the target network to the online
one then, ``reset_momentum_encoder``). Pure grouping and loss functions: ``trainer.losses.smog``.

Implementation choices: the first k-means (``trainer.kmeans``) runs as soon as the memory holds ``num_groups``
features (after the first ceil(K / 2B) batches); before that the groups are random unit vectors (lightly's
initialisation). Features are L2-normalised before the assignment and the update. The group update uses the
GLOBAL batch: per-group sums and counts are all-reduced across processes, assignments and predictions are
gathered (the loss is the global batch's on every rank), the memory holds the gathered features, and k-means
runs on rank 0 and is broadcast, so 2 processes equal 1. The updated groups and memory rows are committed in
``after_step`` (a forward in evaluation changes nothing). Groups, memory and their counters are buffers.
Two views, no multi-crop (the paper adds local crops). Encoder momentum: 0.99 constant (lightly's example);
``final_momentum`` 1.0 gives BYOL's cosine schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.views import view_configs
from trainer.distributed import all_reduce_sum, gather_no_grad, gather_with_grad
from trainer.losses.smog import assign_groups, momentum_update_groups, smog_loss
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .byol import PAPER_AUGMENT, PAPER_SECOND_VIEW
from .deepcluster_v2 import kmeans_on_first_process
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import require_at_least, require_in_range, require_momentum_schedule, require_positive


@dataclass
class SMoGOptions:
    projection_dim: int = 128          # projector / predictor output and group feature width
    projection_hidden_dim: int = 2048  # projector hidden width
    predictor_hidden_dim: int = 2048   # predictor hidden width
    num_groups: int = 3000             # K group features (paper 3000 on ImageNet)
    temperature: float = 0.1           # tau of the contrast against the groups
    group_momentum: float = 0.99       # beta of g <- beta g + (1 - beta) mean of the assigned features
    momentum: float = 0.99             # target network EMA at the start
    final_momentum: float = 0.99       # ... and at the end (cosine schedule; equal: constant)
    memory_size: int = 10000           # recent target features kept for the k-means resets (>= num_groups)
    reset_every_steps: int = 300       # re-initialise the groups by k-means every this many steps; 0: never
    reset_momentum_encoder: bool = True  # at each k-means reset, copy the online network into the target
    kmeans_iterations: int = 10        # Lloyd iterations per k-means
    seed: int = 0                      # random initial groups and k-means initialisations
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0's AugmentConfig fields
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "predictor_hidden_dim",
                         "kmeans_iterations")
        require_at_least(self, 2, "num_groups")
        require_at_least(self, 0, "reset_every_steps")
        if self.memory_size < self.num_groups:
            raise ValueError(f"memory_size ({self.memory_size}) must be >= num_groups ({self.num_groups}): "
                             f"k-means needs at least one feature per group")
        require_positive(self, "temperature")
        require_in_range(self, 0.0, 1.0, "group_momentum")
        require_momentum_schedule(self)
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class SMoG(Objective):
    key = "smog"
    Options = SMoGOptions

    def __init__(self, spec: ObjectiveSpec, options: SMoGOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        2, last_bn=True)
        self.predictor = projection_mlp(options.projection_dim, options.predictor_hidden_dim, options.projection_dim, 2)
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)
        # Own generator: identical on every process, nothing drawn from the global random state.
        generator = torch.Generator().manual_seed(options.seed)
        self.register_buffer("groups", F.normalize(torch.randn(options.num_groups, options.projection_dim,
                                                               generator=generator), dim=1))
        self.register_buffer("groups_from_kmeans", torch.zeros((), dtype=torch.long))  # 1 once k-means set them
        self.register_buffer("memory", torch.zeros(options.memory_size, options.projection_dim))
        self.register_buffer("memory_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_pointer", torch.zeros((), dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def _target(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.target_projector(self.target_encoder.encode_image(images)), dim=1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x0, x1 = batch["view0"], batch["view1"]
        t0, t1 = self._target(x0), self._target(x1)  # targets first: their activations are freed early
        z0 = self.projector(self.encoder.encode_image(x0))
        z1 = self.projector(self.encoder.encode_image(x1))
        p0, p1 = gather_with_grad(self.predictor(z0)), gather_with_grad(self.predictor(z1))
        with torch.no_grad():
            a0, a1 = assign_groups(t0, self.groups), assign_groups(t1, self.groups)
            # Synchronous momentum grouping over the global batch: the loss already sees the moved groups.
            groups = momentum_update_groups(self.groups, torch.cat([t0, t1]), torch.cat([a0, a1]),
                                            self.options.group_momentum, reduce_sum=all_reduce_sum)
            a0, a1 = gather_no_grad(a0), gather_no_grad(a1)
        temperature = self.options.temperature
        loss = 0.5 * (smog_loss(p0, groups, a1, temperature) + smog_loss(p1, groups, a0, temperature))
        if self.training:
            # Gathered view by view: the memory's row order (hence k-means) is that of one process.
            self._pending = (groups, torch.cat([gather_no_grad(t0), gather_no_grad(t1)]))
        return {"loss": loss, "embedding_std": embedding_std(z0),
                "groups_from_kmeans": self.groups_from_kmeans.float()}

    @torch.no_grad()
    def _remember(self, features: torch.Tensor) -> None:
        """Write ``features`` into the ring memory of recent target features."""
        size = self.memory.shape[0]
        features = features[-size:].to(self.memory.dtype)
        rows = (int(self.memory_pointer) + torch.arange(features.shape[0], device=features.device)) % size
        self.memory[rows] = features
        self.memory_pointer.fill_((int(self.memory_pointer) + features.shape[0]) % size)
        self.memory_filled.fill_(min(size, int(self.memory_filled) + features.shape[0]))

    def _reset_due(self, step: int) -> bool:
        """k-means now: first as soon as the memory holds a feature per group, then every ``reset_every_steps``."""
        if not int(self.groups_from_kmeans):
            return int(self.memory_filled) >= self.options.num_groups
        every = self.options.reset_every_steps
        return every > 0 and (step + 1) % every == 0

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            groups, features = pending
            self.groups.copy_(groups)
            self._remember(features)
        if self._reset_due(step):
            filled = int(self.memory_filled)
            centroids, _ = kmeans_on_first_process(self.memory[:filled], self.options.num_groups,
                                                   self.options.kmeans_iterations, self.options.seed + step + 1)
            self.groups.copy_(F.normalize(centroids, dim=1))
            self.groups_from_kmeans.fill_(1)
            if self.options.reset_momentum_encoder:
                ema_update_(self.target_encoder, self.encoder, 0.0)  # momentum 0: a copy of the online weights
                ema_update_(self.target_projector, self.projector, 0.0)
                return
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)
