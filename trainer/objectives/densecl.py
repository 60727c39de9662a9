"""DenseCL (Wang, Zhang, Shen, Kong & Li 2021, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training").

MoCo v2 (``trainer.objectives.moco2``: momentum key encoder, FIFO queue, shuffling BN, MLP head on the pooled
backbone feature, tau 0.2) plus what the paper adds, a dense branch on the backbone's feature map:

* a dense projection head: MoCo v2's MLP as 1x1 convolutions (conv-ReLU-conv, 2048 hidden, 128 out) on every
  cell of the map, and its momentum copy on the key side;
* correspondences: each query cell is matched to the key view's cell with the largest cosine similarity of the
  BACKBONE features (not the projections; sec. 3.3 "extracted from the backbone"), ``dense_correspondence``;
* the dense contrastive loss: each query cell's projection against its matched key cell (positive) and a dense
  queue of negatives (``densecl_loss``); the dense queue holds one key per image, the mean of its key view's
  dense projections (as the authors' code), in a FIFO of ``queue_size`` like the global queue;
* total = (1 - lambda) L_global + lambda L_dense with lambda = ``dense_weight`` (0.5).

Implementation choices: the global branch pools the same feature map the dense branch reads (one backbone pass
per view; for the registry's CNNs this equals the backbone's own pooled feature). Queries and their backbone
cells are gathered across processes, so every rank computes the global batch's loss and enqueues the same keys
(as MoCo here). ``loss`` swaps in another InfoNCE-family loss for both terms. Both queues and their pointers are
buffers (checkpoints and --resume carry them). The exported model is the plain backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.distributed import (
    gather_no_grad,
    gather_with_grad,
    shuffle_batch,
    unshuffle_batch,
    world_size,
)
from trainer.losses import contrastive_loss
from trainer.losses.densecl import dense_correspondence, densecl_loss
from trainer.models.dense import cells, feature_map, probe_shapes
from trainer.models.heads import conv_mlp_head

from .base import ObjectiveSpec, register
from .diagnostics import embedding_std
from .moco import set_batch_norm_groups_
from .moco2 import MoCo2, MoCo2Options
from .momentum import ema_update_, momentum_copy
from .options import require_in_range


@dataclass
class DenseCLOptions(MoCo2Options):
    dense_weight: float = 0.5  # lambda: weight of the dense loss, 1 - lambda on the global one

    def __post_init__(self) -> None:
        super().__post_init__()
        require_in_range(self, 0.0, 1.0, "dense_weight")


@register
class DenseCL(MoCo2):
    key = "densecl"
    Options = DenseCLOptions

    def __init__(self, spec: ObjectiveSpec, options: DenseCLOptions):
        super().__init__(spec, options)  # MoCo v2: projector, key encoder/projector, global queue
        width = probe_shapes(self.encoder.backbone, spec.image_size)[0][0]  # unsupported backbones fail here
        self.dense_projector = conv_mlp_head(width, options.projection_hidden_dim, options.projection_dim)
        self.key_dense_projector = momentum_copy(self.dense_projector)  # no batch norm: nothing to split
        self.register_buffer("dense_queue", F.normalize(torch.randn(options.queue_size, options.projection_dim), dim=1))
        self.register_buffer("dense_queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_dense_keys: torch.Tensor | None = None

    def _key_encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(global key [n, D], dense keys [n, L, D], pooled dense key [n, D], backbone cells [n, L, C]),
        all L2-normalised."""
        backbone = feature_map(self.key_encoder.backbone, images)
        dense = self.key_dense_projector(backbone)
        return (F.normalize(self.key_projector(backbone.mean(dim=(2, 3))), dim=1),
                F.normalize(cells(dense), dim=-1),
                F.normalize(dense.mean(dim=(2, 3)), dim=1),
                F.normalize(cells(backbone), dim=-1))

    @torch.no_grad()
    def dense_keys(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``_key_encode`` of the whole global batch in its original order, with MoCo's shuffling BN."""
        if not self.options.shuffle_bn:
            return tuple(gather_no_grad(t) for t in self._key_encode(images))
        world = world_size()
        groups = self.options.bn_splits // world
        if self.options.bn_splits % world or images.shape[0] % groups:
            raise ValueError(f"{self.key}: bn_splits={self.options.bn_splits} must be a multiple of the {world} "
                             f"processes and split the {images.shape[0]} key images per process evenly")
        set_batch_norm_groups_(self.key_encoder, groups)
        set_batch_norm_groups_(self.key_projector, groups)
        shuffled, restore = shuffle_batch(images)
        return tuple(unshuffle_batch(t, restore) for t in self._key_encode(shuffled))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        backbone = feature_map(self.encoder.backbone, batch["view0"])
        pooled_query = self.projector(backbone.mean(dim=(2, 3)))
        query = gather_with_grad(F.normalize(pooled_query, dim=1))
        dense_query = gather_with_grad(cells(self.dense_projector(backbone)))           # [N, L, D]
        query_cells = gather_no_grad(cells(backbone.detach()))                          # [N, L, C]
        key, dense_key, pooled_dense_key, key_cells = self.dense_keys(batch["view1"])
        options = self.options
        global_loss = contrastive_loss(options.loss, query, key, self.queue.detach(), options.temperature,
                                       **options.loss_options())
        matches = dense_correspondence(query_cells, key_cells)
        dense_loss = densecl_loss(dense_query, dense_key, matches, self.dense_queue.detach(), options.temperature,
                                  options.loss, **options.loss_options())
        if self.training:  # enqueued after the optimizer step (the queues are in this graph)
            self._pending_keys, self._pending_dense_keys = key, pooled_dense_key
        loss = (1.0 - options.dense_weight) * global_loss + options.dense_weight * dense_loss
        return {"loss": loss, "global_loss": global_loss.detach(), "dense_loss": dense_loss.detach(),
                "embedding_std": embedding_std(pooled_query)}

    @torch.no_grad()
    def enqueue_dense(self, keys: torch.Tensor) -> None:
        """FIFO of the pooled dense keys [N, D], as ``enqueue`` for the global queue."""
        size = self.dense_queue.shape[0]
        keys = keys[-size:]
        index = (self.dense_queue_ptr + torch.arange(keys.shape[0], device=self.dense_queue.device)) % size
        self.dense_queue[index] = keys.to(self.dense_queue.dtype)
        self.dense_queue_ptr.copy_((self.dense_queue_ptr + keys.shape[0]) % size)

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)  # global queue, key encoder and key projector
        if self._pending_dense_keys is not None:
            self.enqueue_dense(self._pending_dense_keys)
            self._pending_dense_keys = None
        ema_update_(self.key_dense_projector, self.dense_projector, self.options.momentum)
