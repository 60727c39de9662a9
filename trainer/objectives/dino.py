"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels: the student (backbone -> DINO head) sees every multi-crop view (2 global
crops + V local crops), the teacher (a momentum copy of backbone and head) sees only the 2 global crops, and
the student's softmax at temperature 0.1 is trained to match the teacher's centred, sharpened softmax on the
other crops (``trainer.losses.dino.dino_loss``). The head is DINO's: a 3-layer MLP (GELU) to a 256-d
bottleneck, L2 normalisation, then a weight-normalised linear layer with K outputs whose norms are fixed at 1
(``norm_last_layer``).

State and schedules, all functions of the global step: the teacher's momentum follows a cosine from 0.996 to
1; the teacher temperature warms up linearly (``teacher_temperature_at``); the centre is an EMA (0.9) of the
teacher's mean output over the global batch (sums all-reduced across processes, so 2 processes equal 1) and
is a buffer, like the step counter the temperature is read from, so checkpoints restore both; the last layer
takes no update during the first epoch (its gradient is dropped before the optimizer step). Any backbone
works: ViTs built with a fixed input size (``vit-tiny-cifar``, ``timm:vit_*``) get local crops rendered at
the global size.

Implementation choices: student logits are gathered with gradient and teacher logits without, and the loss is
computed over the global batch on every rank (equal to the paper's per-rank loss after DDP's averaging);
DINO's weight-decay schedule (0.04 -> 0.4), per-parameter gradient clipping and the student's drop-path are
not used: the loop has a fixed weight decay and a global-norm ``--grad-clip``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.multicrop import MultiCropOptions, MultiCropViews, accepted_local_size, crops_in_order, encode_crops
from trainer.data.views import AugmentConfig
from trainer.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, world_size
from trainer.losses.dino import dino_loss, teacher_temperature_at
from trainer.models import DINOHead

from .base import Objective, ObjectiveSpec, register, steps_from_epochs
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy


@dataclass
class DINOOptions(MultiCropOptions):
    out_dim: int = 4096                # K; paper 65536 for ImageNet
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07  # after the warm-up
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_epochs: float = 30.0
    warmup_teacher_temperature_steps: int | None = None  # overrides the epochs when set
    center_momentum: float = 0.9
    momentum: float = 0.996            # teacher EMA, cosine schedule to final_momentum
    final_momentum: float = 1.0
    freeze_last_layer_epochs: float = 1.0
    freeze_last_layer_steps: int | None = None
    num_local_crops: int = 8


@register
class DINO(Objective):
    key = "dino"
    Options = DINOOptions

    def __init__(self, spec: ObjectiveSpec, options: DINOOptions):
        super().__init__(spec, options)
        if options.num_local_crops < 0 or options.out_dim < 2:
            raise ValueError("dino: num_local_crops must be >= 0 and out_dim >= 2")
        if min(options.student_temperature, options.teacher_temperature, options.warmup_teacher_temperature) <= 0:
            raise ValueError("dino: temperatures must be > 0")
        if not 0 <= options.center_momentum < 1:
            raise ValueError(f"dino: center_momentum must be in [0, 1), got {options.center_momentum}")
        self.freeze_last_layer_steps = steps_from_epochs(spec, options.freeze_last_layer_steps,
                                                         options.freeze_last_layer_epochs, "dino freeze_last_layer")
        self.warmup_steps = steps_from_epochs(spec, options.warmup_teacher_temperature_steps,
                                              options.warmup_teacher_temperature_epochs, "dino warmup_teacher_temperature")
        self.local_crop_size = accepted_local_size(self.encoder.backbone, spec.image_size, options.local_crop_size,
                                                   self.encoder.config.channels)
        self.head = DINOHead(self.encoder.embed_dim, options.out_dim, options.hidden_dim, options.bottleneck_dim,
                             options.head_layers, options.use_bn_in_head, options.norm_last_layer)
        self.teacher_encoder = momentum_copy(self.encoder)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(options.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # the teacher temperature's clock
        self._batch_center: torch.Tensor | None = None  # this step's global teacher mean, applied in after_step

    def views(self) -> MultiCropViews:
        config, o = self.encoder.config, self.options
        return MultiCropViews(config.image_size, self.local_crop_size, config.mean, config.std, o.num_local_crops,
                              AugmentConfig(**o.augment), o.global_crop_scale, o.local_crop_scale)

    def teacher_temperature(self) -> float:
        o = self.options
        return teacher_temperature_at(int(self.steps_done), self.warmup_steps, o.warmup_teacher_temperature, o.teacher_temperature)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        crops = crops_in_order(batch)
        count, rows = len(crops), crops[0].shape[0]
        # Teacher first: its activations are freed before the student's graph is built, which keeps the peak
        # memory (and, on CPU, the page faults of fresh allocations) down: faster steps
        # (tests/benchmarks/RESULTS_training_speed.md, "Design measurements").
        with torch.no_grad():
            teacher = self.teacher_head(encode_crops(self.teacher_encoder.encode_image, crops[:2], self.options.encode_crops_jointly)).view(2, rows, -1)
            total = all_reduce_sum(teacher.float().sum(dim=(0, 1)))
            self._batch_center = total / (2 * rows * world_size())
            global_teacher = gather_no_grad(teacher.transpose(0, 1).contiguous()).transpose(0, 1)  # [2, B, K]
        student = self.head(encode_crops(self.encoder.encode_image, crops, self.options.encode_crops_jointly)).view(count, rows, -1)  # [V, n, K]
        global_student = gather_with_grad(student.transpose(0, 1).contiguous()).transpose(0, 1)  # [V, B, K]
        temperature = self.teacher_temperature()
        loss = dino_loss(global_student, global_teacher, self.center, self.options.student_temperature, temperature)
        with torch.no_grad():
            probs = F.softmax((global_teacher.float() - self.center) / temperature, dim=2)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=2).mean()
        return {"loss": loss, "embedding_std": embedding_std(student[0]), "teacher_entropy": entropy,
                "teacher_temperature": loss.new_tensor(temperature)}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step < self.freeze_last_layer_steps:  # DINO's cancel_gradients_last_layer
            for parameter in self.head.last_layer.parameters():
                parameter.grad = None

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        momentum = momentum_at(step, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.teacher_encoder, self.encoder, momentum)
        ema_update_(self.teacher_head, self.head, momentum)
        if self._batch_center is not None:
            self.center.lerp_(self._batch_center.to(self.center.dtype), 1.0 - self.options.center_momentum)
            self._batch_center = None
        self.steps_done.fill_(step + 1)
