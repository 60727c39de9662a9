"""SimCLR v2 (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised Learners"),
the self-supervised pretraining stage.

What changes from SimCLR (``simclr.py``, whose view recipe and global-batch gathering are reused):
  * a deeper projection head: 3 layers by default, each Linear(no bias)-BN, ReLU on all but the last
    (the output BN has no affine parameters; the paper's keeps a scale but no centre);
  * fine-tuning "from the middle layer" of the head: the first ``encoder_head_layers`` head layers (1 of 3,
    the paper's choice) belong to the exported encoder (``ModelConfig.image_head``), so kNN, the linear probe
    and ONNX all see backbone -> Linear-BN-ReLU; the remaining layers live here and are dropped at export;
  * optionally, the memory mechanism from MoCo (``momentum > 0``): a momentum copy of encoder + head (EMA of
    the online weights after every step, constant ``momentum``) embeds both views; its L2-normalised outputs
    are buffered in a FIFO queue of ``queue_size`` keys that serve as extra negatives for every anchor. The
    paper describes exactly this ("a memory network ... whose output will be buffered as negative examples");
    the positives and in-batch negatives stay SimCLR's (the online network's other view and the other
    2(N_global - 1) views). The queue is filled as training goes: only filled slots are used, so the first
    step is plain SimCLR. Queue, fill count and momentum weights are buffers/parameters of this module, so
    checkpoints save them and ``--resume`` restores them.
The contrastive loss is any of the InfoNCE family (``loss``), on per-anchor cosine similarities.
The paper's later stages (supervised fine-tuning, distillation) are not pretraining and are not here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.nce_family import contrastive_loss_from_similarities
from trainer.models import ModelConfig, projection_mlp

from .base import Objective, ObjectiveSpec, default_model_config, register
from .options import InfoNCEOptions


@dataclass
class SimCLRv2Options(InfoNCEOptions):
    temperature: float = 0.5  # SimCLR's CIFAR value (the paper's ImageNet runs use 0.1)
    projection_dim: int = 128
    projection_hidden_dim: int | None = None  # None: the backbone's width, as in the paper
    projection_layers: int = 3
    encoder_head_layers: int = 1  # head layers exported with the encoder (fine-tune from the middle layer)
    momentum: float = 0.0  # > 0 enables the momentum encoder and its queue of negatives
    queue_size: int = 4096
    augment: dict = field(default_factory=dict)  # AugmentConfig fields (SimCLR's two-view recipe)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.encoder_head_layers < self.projection_layers:
            raise ValueError(f"encoder_head_layers must be in [0, projection_layers={self.projection_layers}), "
                             f"got {self.encoder_head_layers}")
        if not 0.0 <= self.momentum < 1.0 or self.queue_size < 0:
            raise ValueError(f"need 0 <= momentum < 1 and queue_size >= 0, got {self.momentum}, {self.queue_size}")


def nt_xent_similarities(z1: torch.Tensor, z2: torch.Tensor,
                         extra_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's per-anchor cosine similarities (Chen et al. 2020, eq. 1), for any InfoNCE-family loss.

    Args:
        z1, z2: [N, D] embeddings of two views (row i of each are positives); normalised here.
        extra_negatives: optional [K, D] keys (a memory queue) added to every anchor's negatives.
    Returns:
        positive [2N]: anchor a = (view, i) against the other view of i, anchors ordered z1 then z2;
        negatives [2N, 2N - 2 + K]: against the 2(N-1) other views of the batch, then the K extra keys.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t()
    rows = torch.arange(2 * n, device=z.device)
    partner = (rows + n) % (2 * n)
    positive = sim[rows, partner]
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[rows, rows] = False
    keep[rows, partner] = False
    negatives = sim[keep].view(2 * n, 2 * n - 2)
    if extra_negatives is not None and extra_negatives.shape[0] > 0:
        negatives = torch.cat([negatives, z @ F.normalize(extra_negatives, dim=1).t()], dim=1)
    return positive, negatives


@register
class SimCLRv2(Objective):
    key = "simclr2"
    Options = SimCLRv2Options

    def __init__(self, spec: ObjectiveSpec, options: SimCLRv2Options):
        super().__init__(spec, options)  # views(): the base's two-view recipe, SimCLR's
        self.loss_options = options.loss_options()
        hidden = options.projection_hidden_dim or self.encoder.feature_dim
        self.projector = projection_mlp(self.encoder.embed_dim, hidden, options.projection_dim,
                                        options.projection_layers - options.encoder_head_layers, last_bn=True)
        self.use_memory = options.momentum > 0 and options.queue_size > 0
        if self.use_memory:
            self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
            self.register_buffer("queue", torch.zeros(options.queue_size, options.projection_dim))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def model_config(self, spec: ObjectiveSpec, options: SimCLRv2Options) -> ModelConfig:
        """The first ``encoder_head_layers`` head layers are exported with the backbone (``image_head``)."""
        head = ({"hidden_dim": options.projection_hidden_dim, "layers": options.encoder_head_layers}
                if options.encoder_head_layers else None)
        return default_model_config(spec, image_head=head)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = torch.cat([batch["view0"], batch["view1"]])  # one pass: BN sees both views together
        z1, z2 = self.projector(self.encoder.encode_image(views)).chunk(2)
        out: dict[str, torch.Tensor] = {}
        memory = None
        if self.use_memory:
            with torch.no_grad():
                k1, k2 = F.normalize(self.momentum_projector(self.momentum_encoder.encode_image(views)), dim=1).chunk(2)
                # Gathered per view, so the key order (all view-0 keys, then view-1) is the one-process order.
                keys = torch.cat([gather_no_grad(k1), gather_no_grad(k2)])
            # A copy: the loss's backward needs these rows after the queue is overwritten below.
            memory = self.queue[: int(self.queue_count)].clone()
            out["queue_fill"] = keys.new_tensor(memory.shape[0] / self.options.queue_size)
            if self.training:
                self._enqueue(keys)
        positive, negatives = nt_xent_similarities(gather_with_grad(z1), gather_with_grad(z2), memory)
        out["loss"] = contrastive_loss_from_similarities(self.options.loss, positive, negatives,
                                                         self.options.temperature, **self.loss_options)
        return out

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write ``keys`` at the pointer (wrapping); only the newest ``queue_size`` survive."""
        size = self.queue.shape[0]
        keys = keys[-size:].to(self.queue.dtype)
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
        self.queue_count.copy_(torch.clamp(self.queue_count + keys.shape[0], max=size))

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the online encoder + head into the momentum copy (MoCo's key-encoder update)."""
        if not self.use_memory:
            return
        m = self.options.momentum
        for online, target in ((self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)):
            for p, q in zip(online.parameters(), target.parameters()):
                q.mul_(m).add_(p.detach(), alpha=1.0 - m)
