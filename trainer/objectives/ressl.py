"""ReSSL (Zheng et al. 2021, "ReSSL: Relational Self-Supervised Learning with Weak Augmentation").

Student: backbone + projection head (Linear-ReLU-Linear, 4096 -> 512 in the paper; dropped at export) on a
strongly augmented view. Teacher: the momentum (EMA) copy of backbone + head, without gradient, on a WEAKLY
augmented view (random resized crop and flip only): the relation it produces is the target, and weak
augmentation keeps that target reliable. A FIFO queue of K earlier teacher embeddings is the set
both relations are taken over: the loss is the cross-entropy between the teacher's softmax over the queue
(tau_t 0.04, sharp) and the student's (tau_s 0.1) (``trainer.losses.ressl``). The teacher's embeddings of the
global batch enter the queue after each optimizer step.

Implementation choices: the teacher momentum is constant (the paper's m; 0.99 on the small datasets, 0.999 on
ImageNet) unless ``final_momentum`` is set, which gives BYOL's cosine schedule from ``momentum`` to it (as
solo-learn). Student embeddings are gathered with gradient and teacher embeddings without, so every process
computes the loss of the global batch (2 processes equal 1 with global batch norm); the paper's code shuffles
the teacher's batch across GPUs (MoCo's shuffling BN) instead, which matters less here since no positive pair
enters the loss. The queue and its pointer are buffers (checkpoints and --resume carry them). The strong view
is ``augment`` (MoCo v2's recipe); the weak view is ``second_view_augment`` laid over it, switching colour
jitter, grayscale, blur and solarize off.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.views import view_configs
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.ressl import ressl
from trainer.models import mlp_head

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import as_number, require_at_least, require_in_range, require_positive

# The paper's strong view (MoCo v2's): crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2,
# blur p 0.5, flip. The weak view keeps only the crop (same scale) and the flip.
STRONG_AUGMENT = {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                  "blur_prob": 0.5, "solarize_prob": 0.0}
WEAK_OVERRIDES = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0, "solarize_prob": 0.0}


@dataclass
class ReSSLOptions:
    student_temperature: float = 0.1    # tau_s (paper 0.1)
    teacher_temperature: float = 0.04   # tau_t (paper 0.04): sharper than the student's
    queue_size: int = 131072            # K (paper 65536 * 2 on ImageNet, 4096 on the small datasets)
    momentum: float = 0.999             # teacher EMA m (paper 0.999 on ImageNet, 0.99 on the small datasets)
    final_momentum: float | None = None  # None: constant m (paper); a value: cosine schedule from m to it
    projection_dim: int = 512           # head output (paper 512)
    projection_hidden_dim: int = 4096   # head hidden width (paper 4096)
    augment: dict = field(default_factory=lambda: dict(STRONG_AUGMENT))  # the student's strong view0
    second_view_augment: dict = field(default_factory=lambda: dict(WEAK_OVERRIDES))  # teacher's weak view1

    def __post_init__(self) -> None:
        require_positive(self, "student_temperature", "teacher_temperature")
        require_in_range(self, 0.0, 1.0, "momentum")
        if self.final_momentum is not None and not self.momentum <= as_number(self, "final_momentum") <= 1.0:
            raise ValueError(f"need momentum <= final_momentum <= 1, got {self.momentum}, {self.final_momentum}")
        require_at_least(self, 1, "queue_size", "projection_dim", "projection_hidden_dim")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class ReSSL(Objective):
    key = "ressl"
    Options = ReSSLOptions

    def __init__(self, spec: ObjectiveSpec, options: ReSSLOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (strong view0, weak view1)
        self.projector = mlp_head(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim)
        # Deep copies draw no random numbers: every process builds the same teacher.
        self.teacher_encoder = momentum_copy(self.encoder)
        self.teacher_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(options.queue_size, options.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # teacher first: its activations are freed before the student's graph is built
            teacher = self.teacher_projector(self.teacher_encoder.encode_image(batch["view1"]))
            teacher = gather_no_grad(F.normalize(teacher, dim=1))
        student = gather_with_grad(self.projector(self.encoder.encode_image(batch["view0"])))
        # The queue changes only in after_step, once backward is done with it.
        loss = ressl(student, teacher, self.queue.detach(), self.options.student_temperature,
                     self.options.teacher_temperature)
        if self.training:
            self._pending = teacher
        return {"loss": loss, "embedding_std": embedding_std(student)}

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor) -> None:
        """FIFO: write ``embeddings`` [N, D] over the oldest queue entries (wrapping around), advance the pointer."""
        size = self.queue.shape[0]
        embeddings = embeddings[-size:]  # a batch larger than the queue keeps only its newest rows
        index = (self.queue_ptr + torch.arange(embeddings.shape[0], device=self.queue.device)) % size
        self.queue[index] = embeddings.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + embeddings.shape[0]) % size)

    def after_step(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            self.enqueue(self._pending)
            self._pending = None
        momentum = self.options.momentum
        if self.options.final_momentum is not None:
            momentum = momentum_at(step + 1, total_steps, momentum, self.options.final_momentum)
        ema_update_(self.teacher_encoder, self.encoder, momentum)
        ema_update_(self.teacher_projector, self.projector, momentum)
