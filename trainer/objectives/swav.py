"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

Every crop goes through backbone -> 2-layer projection MLP -> L2 normalisation -> K prototypes (a linear
layer without bias whose rows are re-normalised to unit length after every optimizer step, as the authors'
code does before each forward). The codes of the two global crops come from Sinkhorn-Knopp (3 iterations,
epsilon 0.05) with the equipartition taken over the global batch (sums all-reduced across processes); each
code is predicted from the scores of every other crop (swapped prediction, temperature 0.1). Multi-crop:
2 global crops at the image size + V local crops at ``local_crop_size`` (one backbone pass per crop, or per
resolution with ``encode_crops_jointly``).

The prototypes take no update during the first epoch (``freeze_prototypes_epochs``, or
``freeze_prototypes_steps``): their gradient is dropped before the optimizer step. With
``queue_length > 0`` the normalised embeddings of the global crops are also pushed into a FIFO queue from
``queue_start_epochs`` on; once full, its scores join the batch in Sinkhorn (more samples than prototypes at
small batch sizes), and only the batch's codes are used. The queue holds the gathered global batch and is
identical on every process; each process feeds Sinkhorn its 1/world share of it, so the all-reduced sums run
over the whole queue exactly once, as on one process.

Implementation choice: scores are gathered across processes with gradient and the loss is computed over the
global batch on every rank, which after DDP's gradient averaging equals the paper's per-rank loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.multicrop import (
    MultiCropOptions,
    MultiCropViews,
    accepted_local_size,
    crops_in_order,
    encode_crops,
)
from trainer.data.views import AugmentConfig
from trainer.distributed import (
    all_reduce_sum,
    gather_no_grad,
    gather_with_grad,
    max_over_processes,
    rank,
    world_size,
)
from trainer.losses.clustering import sinkhorn, swav_loss
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register, steps_from_epochs
from .diagnostics import embedding_std


@dataclass
class SwAVOptions(MultiCropOptions):
    projection_dim: int = 128
    projection_hidden_dim: int = 2048
    num_prototypes: int = 300          # paper 3000 for ImageNet's 1000 classes
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    assigned_crops: list = field(default_factory=lambda: [0, 1])  # crops whose codes are computed (globals)
    freeze_prototypes_epochs: float = 1.0
    freeze_prototypes_steps: int | None = None  # overrides the epochs when set
    queue_length: int = 0              # 0: no queue; the paper uses 3840 at batch 256
    queue_start_epochs: float = 15.0
    queue_start_steps: int | None = None


@register
class SwAV(Objective):
    key = "swav"
    Options = SwAVOptions

    def __init__(self, spec: ObjectiveSpec, options: SwAVOptions):
        super().__init__(spec, options)
        crops = 2 + options.num_local_crops
        if options.num_local_crops < 0 or not options.assigned_crops or any(
                not 0 <= int(c) < 2 for c in options.assigned_crops) or len(set(options.assigned_crops)) != len(options.assigned_crops):
            raise ValueError(f"swav: assigned_crops must be distinct global crops (0, 1), got {options.assigned_crops} "
                             f"with {crops} crops")
        if options.num_prototypes < 2 or options.temperature <= 0:
            raise ValueError("swav: num_prototypes must be >= 2 and temperature > 0")
        if options.queue_length < 0 or options.queue_length % world_size():
            raise ValueError(f"swav: queue_length must be >= 0 and a multiple of the {world_size()} processes, "
                             f"got {options.queue_length}")
        self.assigned_crops = [int(c) for c in options.assigned_crops]
        self.freeze_prototypes_steps = steps_from_epochs(spec, options.freeze_prototypes_steps,
                                                         options.freeze_prototypes_epochs, "swav freeze_prototypes")
        self.queue_start_step = (steps_from_epochs(spec, options.queue_start_steps, options.queue_start_epochs,
                                                   "swav queue_start") if options.queue_length else 0)
        self.local_crop_size = accepted_local_size(self.encoder.backbone, spec.image_size, options.local_crop_size,
                                                   self.encoder.config.channels)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim, 2)
        self.prototypes = nn.Linear(options.projection_dim, options.num_prototypes, bias=False)
        self._normalise_prototypes()
        # Global FIFO of the assigned crops' normalised embeddings (newest first) and how many rows are filled.
        self.register_buffer("queue", torch.zeros(len(self.assigned_crops), options.queue_length, options.projection_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None  # this step's gathered embeddings, enqueued in after_step

    def views(self) -> MultiCropViews:
        config, o = self.encoder.config, self.options
        return MultiCropViews(config.image_size, self.local_crop_size, config.mean, config.std, o.num_local_crops,
                              AugmentConfig(**o.augment), o.global_crop_scale, o.local_crop_scale)

    @torch.no_grad()
    def _normalise_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def _queue_share(self, index: int) -> torch.Tensor | None:
        """This process's 1/world share of the queue of assigned crop ``index``, or None until it is full."""
        length = self.options.queue_length
        if not length or int(self.queue_filled) < length:
            return None
        share = length // world_size()
        return self.queue[index, rank() * share:(rank() + 1) * share]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        crops = crops_in_order(batch)
        count, rows = len(crops), crops[0].shape[0]
        z = F.normalize(self.projector(encode_crops(self.encoder.encode_image, crops, self.options.encode_crops_jointly)), dim=1)
        scores = self.prototypes(z).view(count, rows, -1)  # [V, n, K]
        codes = []
        with torch.no_grad():
            for index, crop in enumerate(self.assigned_crops):
                local = scores[crop].detach()
                queued = self._queue_share(index)
                if queued is not None:
                    local = torch.cat([queued @ self.prototypes.weight.t(), local])
                # Equipartition over the global batch: Sinkhorn's sums and maximum run across processes.
                code = sinkhorn(local, self.options.epsilon, self.options.sinkhorn_iterations,
                                reduce_sum=all_reduce_sum, reduce_max=max_over_processes,
                                total_samples=local.shape[0] * world_size())
                codes.append(gather_no_grad(code[-rows:]))
            if self.options.queue_length:
                assigned = z.view(count, rows, -1)[self.assigned_crops].detach()
                self._pending = gather_no_grad(assigned.transpose(0, 1).contiguous())  # [B, A, D]
        global_scores = gather_with_grad(scores.transpose(0, 1).contiguous()).transpose(0, 1)  # [V, B, K]
        loss = swav_loss(global_scores, torch.stack(codes), self.assigned_crops, self.options.temperature)
        return {"loss": loss, "embedding_std": embedding_std(z[:rows]),
                "queue_used": loss.new_tensor(float(self._queue_share(0) is not None))}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.freeze_prototypes_steps:  # SwAV's freeze_prototypes_niters: prototypes fixed at first
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self._normalise_prototypes()
        pending, self._pending = self._pending, None
        if pending is None or step < self.queue_start_step:
            return
        length, incoming = self.options.queue_length, pending.shape[0]
        if incoming > length:
            raise ValueError(f"swav: queue_length {length} is shorter than the global batch {incoming}")
        self.queue[:, incoming:] = self.queue[:, :length - incoming].clone()
        self.queue[:, :incoming] = pending.transpose(0, 1).to(self.queue.dtype)
        self.queue_filled.fill_(min(length, int(self.queue_filled) + incoming))
