"""MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning").

A query encoder (``self.encoder`` + a linear 128-d fc, the fc dropped at export) and a key encoder that is
its momentum copy, theta_k <- m theta_k + (1 - m) theta_q with m = 0.999 (eq. 2), updated after every
optimizer step. Keys of the second view index a dictionary: a FIFO queue of K keys (65536 in the paper)
whose oldest batch is replaced by the current keys after each step. The loss is InfoNCE over 1 positive
and the K queue negatives, tau = 0.07 (eq. 1); the ``loss`` option swaps in another InfoNCE-family loss.

Shuffling BN (sec. 3.3): the key batch is gathered from all processes, shuffled with one permutation drawn
on rank 0, encoded in ``bn_splits`` groups whose batch-norm statistics are computed separately, and put
back in order, so a query and its positive key never share batch statistics. With W processes each rank
encodes its share of the shuffled batch in bn_splits / W groups; on one process the same split-BN runs on
the whole shuffled batch, which is the paper's 8-GPU setting simulated on one device.

Implementation choices: the queue and its pointer are buffers (checkpoints carry them, ``--resume``
restores them); the keys of the whole global batch are enqueued on every rank, so all queues stay
identical; the key network's batch norms are ``SplitBatchNorm`` (not a ``_BatchNorm`` subclass, so the
loop's global batch norm never replaces them), while the query side keeps the loop's global batch norm
(the paper's per-GPU query BN only matters for the leak through the keys, which the shuffle removes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trainer.distributed import gather_no_grad, gather_with_grad, shuffle_batch, unshuffle_batch, world_size
from trainer.losses import contrastive_loss

from .base import Objective, ObjectiveSpec, register
from .momentum import ema_update_, momentum_copy
from .options import InfoNCEOptions, require_at_least


def split_batch_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm with statistics computed separately over ``groups`` contiguous equal chunks of the batch.

    Args:
        x: [N, C, *] with N divisible by ``groups``; weight, bias: [C] or None.
    Returns:
        (output [N, C, *], mean [G, C], unbiased variance [G, C]); chunk g is normalised by its own
        mean and biased variance, exactly as if it were run through batch norm alone.
    """
    n, channels = x.shape[:2]
    if n % groups:
        raise ValueError(f"split batch norm: {groups} groups do not divide a batch of {n}")
    grouped = x.reshape(groups, n // groups, *x.shape[1:])
    dims = [1] + list(range(3, grouped.dim()))
    # One statistics pass and one fused scale-and-shift pass: this runs on every key batch.
    var, mean = torch.var_mean(grouped, dim=dims, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        shape = [1, 1, channels] + [1] * (x.dim() - 2)
        scale = scale * weight.view(shape)
        shift = bias.view(shape) - mean * scale
    else:
        shift = -mean * scale
    out = torch.addcmul(shift, grouped, scale)
    count = grouped[0].numel() / channels
    unbiased = var.reshape(groups, channels) * count / max(count - 1.0, 1.0)
    return out.reshape(x.shape), mean.reshape(groups, channels), unbiased


class SplitBatchNorm(nn.Module):
    """A batch norm whose training statistics come from ``groups`` chunks of the batch (``split_batch_norm``).

    Same parameter and buffer names as ``nn.BatchNorm*d`` (so EMA updates match it by name); running
    statistics follow the mean over groups. In eval mode it is ordinary batch norm on the running statistics.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.num_features, self.eps, self.momentum = source.num_features, source.eps, source.momentum
        self.groups = 1
        self.weight = nn.Parameter(source.weight.detach().clone(), requires_grad=False) if source.affine else None
        self.bias = nn.Parameter(source.bias.detach().clone(), requires_grad=False) if source.affine else None
        self.track_running_stats = source.track_running_stats
        if self.track_running_stats:
            self.register_buffer("running_mean", source.running_mean.detach().clone())
            self.register_buffer("running_var", source.running_var.detach().clone())
            self.register_buffer("num_batches_tracked", source.num_batches_tracked.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # Statistics in float32 even under autocast (half-precision variances of small groups are coarse).
        out, mean, var = split_batch_norm(x.float(), self.groups, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(var.mean(0).to(self.running_var.dtype), momentum)
        return out.to(x.dtype)


def use_split_batch_norm_(module: nn.Module) -> nn.Module:
    """Replace every batch norm in ``module`` (in place) by a ``SplitBatchNorm`` with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = SplitBatchNorm(child)
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            use_split_batch_norm_(child)
    return module


def set_batch_norm_groups_(module: nn.Module, groups: int) -> None:
    for child in module.modules():
        if isinstance(child, SplitBatchNorm):
            child.groups = groups


@dataclass
class MoCoOptions(InfoNCEOptions):
    temperature: float = 0.07       # tau (v1)
    queue_size: int = 65536         # K, the dictionary size
    momentum: float = 0.999         # m of the key encoder
    projection_dim: int = 128       # output of the fc layer (the contrastive space)
    shuffle_bn: bool = True         # shuffling BN on the key side (False: plain BN, the paper's "leak" ablation)
    bn_splits: int = 8              # BN groups of the global key batch (the paper's 8 GPUs)
    # v1's augmentation: crop scale (0.2, 1), colour jitter always applied, 20% grayscale, flip.
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5,
                                                   "jitter_prob": 1.0, "grayscale_prob": 0.2, "blur_prob": 0.0})

    # embed_dim was this width's name; encoder.embed_dim is the backbone's output, a different width.
    ALIASES: ClassVar[dict[str, str]] = {"embed_dim": "projection_dim"}

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, 1, "queue_size", "bn_splits")


@register
class MoCo(Objective):
    key = "moco"
    Options = MoCoOptions

    def __init__(self, spec: ObjectiveSpec, options: MoCoOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe from options.augment
        self.projector = self.build_head(self.encoder.embed_dim)
        # Built deterministically (deep copies), so every process holds the same key network.
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)
        if options.shuffle_bn:
            use_split_batch_norm_(self.key_encoder)
            use_split_batch_norm_(self.key_projector)
        self.register_buffer("queue", F.normalize(torch.randn(options.queue_size, options.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: torch.Tensor | None = None

    def build_head(self, in_dim: int) -> nn.Module:
        """v1: the encoder's fc layer, a linear map to ``projection_dim``."""
        return nn.Linear(in_dim, self.options.projection_dim)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys of the whole global batch [N, D] in its original order (shuffled BN inside)."""
        def encode(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.key_projector(self.key_encoder.encode_image(x)), dim=1)

        if not self.options.shuffle_bn:
            return gather_no_grad(encode(images))
        world = world_size()
        if self.options.bn_splits % world:
            raise ValueError(f"{self.key}: bn_splits={self.options.bn_splits} must be a multiple of the {world} processes")
        groups = self.options.bn_splits // world
        if images.shape[0] % groups:
            raise ValueError(f"{self.key}: bn_splits={self.options.bn_splits} must divide the global key batch "
                             f"({images.shape[0]} per process, {groups} groups each); set bn_splits or the batch size")
        set_batch_norm_groups_(self.key_encoder, groups)
        set_batch_norm_groups_(self.key_projector, groups)
        shuffled, restore = shuffle_batch(images)
        return unshuffle_batch(encode(shuffled), restore)

    def queries_and_keys(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised queries of view0 and keys of view1 over the global batch.

        Queries are gathered with gradient so every rank computes the loss of the whole global batch (the same
        value and, after DDP's averaging, the same gradients as one process holding it); keys carry none."""
        query = gather_with_grad(F.normalize(self.projector(self.encoder.encode_image(batch["view0"])), dim=1))
        return query, self.keys(batch["view1"])

    def contrast(self, query: torch.Tensor, key: torch.Tensor) -> dict[str, torch.Tensor]:
        """InfoNCE of ``query`` against its ``key`` and the queue, and the pretext task's top-1 accuracy; the keys
        are enqueued after the optimizer step (the queue is in this graph). Subclasses adding a term reuse it."""
        negatives = self.queue.detach()
        loss = contrastive_loss(self.options.loss, query, key, negatives, self.options.temperature,
                                **self.options.loss_options())
        if self.training:
            self._pending_keys = key
        with torch.no_grad():  # the positive out-scores every queue entry: the pretext task's top-1
            positive = (query * key).sum(dim=1)
            accuracy = (positive > (query @ negatives.to(query.dtype).t()).max(dim=1).values).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.contrast(*self.queries_and_keys(batch))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write ``keys`` [N, D] over the oldest queue entries (wrapping around), advance the pointer."""
        size = self.queue.shape[0]
        keys = keys[-size:]  # a batch larger than the queue keeps only its newest keys
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def after_step(self, step: int, total_steps: int) -> None:
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None
        ema_update_(self.key_encoder, self.encoder, self.options.momentum)
        ema_update_(self.key_projector, self.projector, self.options.momentum)
