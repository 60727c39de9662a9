"""DeepCluster-v2 (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", the SwAV paper's improved DeepCluster; the authors' ``main_deepclusterv2.py``).

What it adds to DeepCluster (Caron et al. 2018): the clustering is redone at the start of every epoch by spherical
k-means over a memory of the normalised projections of every training sample, several prototype sets (3 x 3000 on
ImageNet) are clustered independently, the prototypes are set to the centroids and stay frozen (the reference
freezes them for all 300k iterations of its runs), and every crop of a sample predicts the sample's assignment in
each set by a cross-entropy over its prototype scores at temperature 0.1 (``trainer.losses.deepcluster``), with
SwAV's architecture: backbone -> 2-layer projection MLP (2048 -> 128) -> L2 normalisation, and multi-crop
(2 global + V local crops; the memory and the clustering use the 2 global ones).

Memory: one row per training sample and global crop, indexed by the sample's dense slot ``id`` (0..n-1; see
``trainer.objectives.instdisc``), written after every step with the step's embeddings of the whole global batch;
prototype set h clusters the memory of global crop h mod 2, as the reference's ``crops_for_assign`` cycle.
Memory, "seen" marks, assignments and prototypes are buffers, so checkpoints and ``--resume`` carry them.

Implementation choices: the reference fills the memory with a pass of the untrained network before epoch 0; the
loop has no such pass, so during the first epoch (``cluster_every_*``) each sample's targets are random cluster
indices to random unit prototypes (seeded, identical on every process), and the first k-means runs over the
embeddings written during that epoch. Samples the last clustering did not see are left out of the loss (the
reference's ignore_index). k-means is faiss's (``trainer.kmeans``, 10 iterations), run on rank 0 over the memory
every process holds and broadcast, so all processes get the same prototypes and assignments; a prototype set
larger than the training set is cut to the training set's size (warning). The normalised embeddings are gathered
across processes with gradient, so the loss is the global batch's on every rank and 2 processes equal 1.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.multicrop import (
    MultiCropOptions,
    MultiCropViews,
    accepted_local_size,
    crops_in_order,
    encode_crops,
)
from trainer.data.views import AugmentConfig, view_configs
from trainer.distributed import (
    broadcast_from_first,
    gather_no_grad,
    gather_with_grad,
    rank,
)
from trainer.kmeans import kmeans
from trainer.losses.deepcluster import deepcluster_v2_loss
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register, steps_from_epochs
from .diagnostics import embedding_std
from .instdisc import SLOTS_HINT
from .options import require_at_least, require_positive


@torch.no_grad()
def kmeans_on_first_process(features: torch.Tensor, k: int, iterations: int, seed: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of ``features`` [N, D] (identical on every process) run once, on rank 0, and broadcast:
    every process gets the same centroids [k, D] and assignments [N], whatever faiss does on each device."""
    if rank() == 0:
        centroids, assignments = kmeans(features, k, iterations, seed, spherical=True)
    else:
        centroids = features.new_empty(k, features.shape[1], dtype=torch.float32)
        assignments = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    return broadcast_from_first(centroids), broadcast_from_first(assignments)


@dataclass
class DeepClusterV2Options(MultiCropOptions):
    projection_dim: int = 128             # feat_dim: the normalised embedding the prototypes score
    projection_hidden_dim: int = 2048     # hidden_mlp (2048 for ResNet-50)
    num_prototypes: list = field(default_factory=lambda: [3000, 3000, 3000])  # K of each prototype set
    temperature: float = 0.1              # tau of the softmax over prototypes
    kmeans_iterations: int = 10           # Lloyd iterations per clustering (reference 10)
    cluster_every_epochs: float = 1.0     # re-cluster the memory at the start of every epoch
    cluster_every_steps: int | None = None  # overrides the epochs when set
    seed: int = 31                        # k-means initialisations and the first epoch's random targets

    def __post_init__(self):
        if isinstance(self.num_prototypes, int):
            self.num_prototypes = [self.num_prototypes]
        if not self.num_prototypes or any(int(k) < 2 for k in self.num_prototypes):
            raise ValueError(f"num_prototypes must be a non-empty list of sizes >= 2, got {self.num_prototypes}")
        self.num_prototypes = [int(k) for k in self.num_prototypes]
        require_positive(self, "temperature", "cluster_every_epochs")
        if self.cluster_every_steps is not None and self.cluster_every_steps < 1:
            raise ValueError(f"cluster_every_steps must be >= 1, got {self.cluster_every_steps}")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "kmeans_iterations")
        require_at_least(self, 0, "num_local_crops")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class DeepClusterV2(Objective):
    key = "deepcluster_v2"
    Options = DeepClusterV2Options
    dense_sample_ids = True  # batch["id"]: the sample's dense slot 0..n-1 (trainer.data.slots)

    def __init__(self, spec: ObjectiveSpec, options: DeepClusterV2Options):
        super().__init__(spec, options)
        if not spec.num_train_samples or spec.num_train_samples < 2:
            raise ValueError(f"deepcluster_v2 needs the number of training samples (>= 2) for its memory, got "
                             f"{spec.num_train_samples}")
        self.num_data = int(spec.num_train_samples)
        self.sizes = [min(k, self.num_data) for k in options.num_prototypes]
        if self.sizes != options.num_prototypes:
            warnings.warn(f"deepcluster_v2: num_prototypes {options.num_prototypes} exceed the {self.num_data} "
                          f"training samples; using {self.sizes}", stacklevel=2)
        self.cluster_every = steps_from_epochs(spec, options.cluster_every_steps, options.cluster_every_epochs,
                                               "deepcluster_v2 cluster_every")
        if self.cluster_every < 1:
            raise ValueError(f"deepcluster_v2: clustering every {self.cluster_every} steps; need >= 1")
        self.local_crop_size = accepted_local_size(self.encoder.backbone, spec.image_size, options.local_crop_size,
                                                   self.encoder.config.channels)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim,
                                        options.projection_dim, 2)
        # A generator of its own: the first epoch's targets are the same on every process and draw nothing from
        # the global random state.
        generator = torch.Generator().manual_seed(options.seed)
        for h, k in enumerate(self.sizes):
            self.register_buffer(f"prototypes{h}", F.normalize(torch.randn(k, options.projection_dim,
                                                                           generator=generator), dim=1))
        self.register_buffer("assignments", torch.stack([torch.randint(k, (self.num_data,), generator=generator)
                                                         for k in self.sizes]))  # [H, n]; -1: not clustered
        self.register_buffer("memory", torch.zeros(2, self.num_data, options.projection_dim))
        # uint8, not bool: DDP broadcasts buffers and gloo has no bool.
        self.register_buffer("seen", torch.zeros(self.num_data, dtype=torch.uint8))
        self.register_buffer("clusterings", torch.zeros((), dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def views(self) -> MultiCropViews:
        config, o = self.encoder.config, self.options
        return MultiCropViews(config.image_size, self.local_crop_size, config.mean, config.std, o.num_local_crops,
                              AugmentConfig(**o.augment), o.global_crop_scale, o.local_crop_scale)

    def prototype_sets(self) -> list[torch.Tensor]:
        return [getattr(self, f"prototypes{h}") for h in range(len(self.sizes))]

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_data):
            raise ValueError(f"deepcluster_v2: sample id {int(ids.max())} (min {int(ids.min())}) is outside the "
                             f"memory of {self.num_data} training samples; {SLOTS_HINT}")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        crops = crops_in_order(batch)
        count, rows = len(crops), crops[0].shape[0]
        ids = batch["id"]
        self._check_ids(ids)
        z = F.normalize(self.projector(encode_crops(self.encoder.encode_image, crops,
                                                    self.options.encode_crops_jointly)), dim=1)
        # [V, B, D] over the global batch (rank order), with gradient: the loss is the global batch's mean.
        z_global = gather_with_grad(z.view(count, rows, -1).transpose(0, 1).contiguous()).transpose(0, 1)
        global_ids = gather_no_grad(ids)
        scores = [z_global @ prototypes.t() for prototypes in self.prototype_sets()]
        loss = deepcluster_v2_loss(scores, self.assignments[:, global_ids], self.options.temperature)
        if self.training:
            self._pending = (global_ids.detach(), z_global[:2].detach())
        return {"loss": loss, "embedding_std": embedding_std(z[:rows]),
                "clusterings": self.clusterings.float()}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Write the step's global-crop embeddings into the memory; at the end of an epoch, re-cluster it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            ids, embeddings = pending
            self.memory[:, ids] = embeddings.to(self.memory.dtype)
            self.seen[ids] = 1
        if (step + 1) % self.cluster_every == 0:
            self.cluster(seed=self.options.seed + len(self.sizes) * (step + 1))

    @torch.no_grad()
    def cluster(self, seed: int) -> None:
        """k-means of every prototype set over the memory rows written so far: prototypes <- normalised centroids,
        assignments of those samples <- their clusters, every other sample -1 (left out of the loss)."""
        seen = self.seen.bool().nonzero().squeeze(1)
        if seen.numel() < max(self.sizes):
            warnings.warn(f"deepcluster_v2: only {seen.numel()} samples in the memory, fewer than the "
                          f"{max(self.sizes)} prototypes; clustering skipped", stacklevel=2)
            return
        for h, prototypes in enumerate(self.prototype_sets()):
            centroids, assigned = kmeans_on_first_process(self.memory[h % 2, seen], self.sizes[h],
                                                          self.options.kmeans_iterations, seed + h)
            prototypes.copy_(F.normalize(centroids, dim=1))
            self.assignments[h].fill_(-1)
            self.assignments[h, seen] = assigned
        self.clusterings += 1
