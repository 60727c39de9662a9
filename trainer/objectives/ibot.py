"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

DINO on the class tokens plus masked image modelling with an online tokenizer: the teacher (an EMA of the
student) sees the two global crops unmasked; the student sees them with block-wise masked patches (the patch
embeddings replaced by a learnable mask token inside the encoder, ``forward_vit(..., mask, mask_token)``) and the
local crops unmasked. Two losses, weighted lambda1 = lambda2 = 1:

* [CLS]: DINO's cross-view self-distillation of the class tokens (every student crop against the other global
  crops' teacher distributions), with the teacher centred by an EMA (0.9) of its mean output over the global
  batch and sharpened at a temperature warmed up 0.04 -> 0.07 (``trainer.objectives.dino``: EMA teacher,
  centre, step clock, frozen last layer in the first epoch, all reused from ``DINO``).
* patches: at every masked patch of a global crop the student's distribution is trained to match the teacher's
  distribution at the same patch of the same crop (``trainer.losses.ibot.ibot_patch_loss``: per-image mean over
  the masked patches, then the mean over images), with its own centre (EMA 0.9 of the teacher's mean over all
  patches of the global batch) and its own temperatures (0.04 -> 0.07).

Masks are drawn in the data workers (``trainer.data.masking.blockwise_mask``, ``mask/global0`` and
``mask/global1``): each global crop is masked with probability 0.5, a ratio r ~ U(0.1, 0.5) of its patches, in
rectangles of at least (min(rows, columns) // 3)^2 patches with aspect ratios in (0.3, 1 / 0.3) (the authors'
``ImageFolderMask``). Local crops are never masked and run at their own size (``forward_vit`` resamples the
position embedding).

Implementation choices: one head for class and patch tokens (``shared_head``, the released ViT-S/16 setting
and the paper's default; ``shared_head: false`` builds a second, whole head of ``patch_out_dim`` outputs, as
DINOv2 does, where iBOT's code shares the MLP and unties only the last layer). Centres are buffers fed by
all-reduced sums and both losses are means over the global batch on every process, so 2 processes give the
loss and gradients of 1. The mask token is a parameter of the objective (zeros, the authors' init), not of the
exported encoder, and takes no weight decay. Not used, as for DINO here: the weight-decay schedule
(0.04 -> 0.4), per-parameter gradient clipping and the student's drop path. The teacher's head runs on every
patch (the patch centre is their mean), the student's on the masked patches only (the loss reads no other).
The exported model is the student's ViT (class token), as for every objective here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.masking import WithKeepIndices, blockwise_mask
from trainer.data.multicrop import crops_in_order, encode_crops
from trainer.distributed import (
    all_reduce_sum,
    mean_over_processes,
    world_size,
)
from trainer.losses.dino import teacher_temperature_at
from trainer.losses.ibot import dino_loss_from_probabilities, ibot_patch_loss
from trainer.models import DINOHead
from trainer.models.vit import ViTOutput, forward_vit, patch_grid, vit_backbone

from .base import ObjectiveSpec, register
from .diagnostics import embedding_std
from .dino import DINO, DINOOptions
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import (
    as_number,
    require_at_least,
    require_in_range,
    require_momentum_schedule,
    require_non_negative,
    require_positive,
)


def _pair(value, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    return low, high


@dataclass
class IBOTOptions(DINOOptions):
    out_dim: int = 8192                          # K of the [CLS] head (paper 8192)
    patch_out_dim: int = 8192                    # K of the patch head when it is not shared (paper 8192)
    shared_head: bool = True                     # one head for [CLS] and patches (released ViT-S/16 setting)
    norm_last_layer: bool = False                # released ViT-S/16 setting
    teacher_temperature: float = 0.07            # [CLS], after the warm-up from warmup_teacher_temperature
    teacher_patch_temperature: float = 0.07      # patches, after the warm-up (same warm-up length)
    warmup_teacher_patch_temperature: float = 0.04
    patch_center_momentum: float = 0.9
    # "all": the teacher's patch head runs on every patch and the patch centre is their mean (the authors' code);
    # "masked": on the masked patches only, the centre their mean (lightly's IBOTPatchLoss, DINOv2's centring):
    # L / M times less teacher-head compute, which dominates a small ViT's step.
    patch_center: str = "all"
    dino_loss_weight: float = 1.0                # lambda1
    ibot_loss_weight: float = 1.0                # lambda2
    mask_ratio: tuple = (0.1, 0.5)               # r ~ U(low, high) per masked crop (pred_ratio 0.3 +- 0.2)
    mask_probability: float = 0.5                # chance a global crop is masked at all
    min_mask_block: int | None = None            # smallest block in patches; None: (min(rows, columns) // 3)^2
    max_mask_block_ratio: float = 1.0            # largest block as a fraction of the grid (1: no cap)
    mask_aspect_ratio: tuple = (0.3, 1 / 0.3)
    num_local_crops: int = 10
    global_crop_scale: tuple = (0.25, 1.0)
    local_crop_scale: tuple = (0.05, 0.25)

    def __post_init__(self):
        require_at_least(self, 2, "out_dim", "patch_out_dim")
        require_at_least(self, 1, "hidden_dim", "bottleneck_dim", "head_layers", "local_crop_size")
        require_at_least(self, 0, "num_local_crops")
        require_positive(self, "student_temperature", "teacher_temperature", "warmup_teacher_temperature",
                         "teacher_patch_temperature", "warmup_teacher_patch_temperature")
        require_non_negative(self, "dino_loss_weight", "ibot_loss_weight")
        for name in ("center_momentum", "patch_center_momentum"):
            if not 0.0 <= as_number(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        require_momentum_schedule(self)
        low, high = self.mask_ratio = _pair(self.mask_ratio, "mask_ratio")
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask_ratio must be (low, high) with 0 <= low <= high < 1, got {list(self.mask_ratio)}")
        require_in_range(self, 0.0, 1.0, "mask_probability")
        if self.min_mask_block is not None and self.min_mask_block < 1:
            raise ValueError(f"min_mask_block must be None or >= 1, got {self.min_mask_block}")
        if not 0.0 < as_number(self, "max_mask_block_ratio") <= 1.0:
            raise ValueError(f"max_mask_block_ratio must be in (0, 1], got {self.max_mask_block_ratio}")
        low, high = self.mask_aspect_ratio = _pair(self.mask_aspect_ratio, "mask_aspect_ratio")
        if not 0.0 < low <= high:
            raise ValueError(f"mask_aspect_ratio must be (low, high) with 0 < low <= high, got {[low, high]}")
        if self.patch_center not in ("all", "masked"):
            raise ValueError(f"patch_center must be 'all' or 'masked', got {self.patch_center!r}")
        if self.use_bn_in_head:
            raise ValueError("use_bn_in_head is not supported: the patch head sees a varying number of masked "
                             "patches, none on some steps")


@register
class IBOT(DINO):
    key = "ibot"
    Options = IBOTOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: IBOTOptions):
        super().__init__(spec, options)  # DINO: [CLS] head, EMA teacher, centre, step clock, schedules
        vit = vit_backbone(self.encoder, self.key)
        if vit.cls_token is None:
            raise ValueError(f"{self.key} distils the class token: the ViT {spec.backbone} has none")
        self.grid = patch_grid(vit, spec.image_size)
        if options.local_crop_size > spec.image_size:
            raise ValueError(f"{self.key}: local_crop_size {options.local_crop_size} is larger than the image size "
                             f"{spec.image_size}")
        try:
            patch_grid(vit, options.local_crop_size)
        except ValueError as error:
            raise ValueError(f"{self.key}: local_crop_size: {error}") from None
        self.local_crop_size = options.local_crop_size  # forward_vit runs the ViT at this size (DINO's probe may not)
        rows, columns = self.grid
        self.min_mask_block = (options.min_mask_block if options.min_mask_block is not None
                               else max(1, min(rows, columns) // 3) ** 2)
        self.max_mask_block = max(self.min_mask_block, int(options.max_mask_block_ratio * rows * columns))
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))  # the authors' masked_embed, zeros
        if not options.shared_head:
            self.patch_head = DINOHead(self.encoder.embed_dim, options.patch_out_dim, options.hidden_dim,
                                       options.bottleneck_dim, options.head_layers, False, options.norm_last_layer)
            self.teacher_patch_head = momentum_copy(self.patch_head)
        patch_dim = options.out_dim if options.shared_head else options.patch_out_dim
        self.register_buffer("patch_center", torch.zeros(patch_dim))
        self._batch_patch_center: torch.Tensor | None = None  # this step's teacher patch mean, applied in after_step

    def views(self) -> WithKeepIndices:
        """DINO's multi-crop views with a block-wise mask per global crop (``mask/global0``, ``mask/global1``)."""
        o = self.options
        draw = functools.partial(blockwise_mask, self.grid, o.mask_ratio, o.mask_probability, self.min_mask_block,
                                 self.max_mask_block, o.mask_aspect_ratio)
        return WithKeepIndices(super().views(), {"global0": draw, "global1": draw}, key_prefix="mask")

    def _student_patch_head(self) -> nn.Module:
        return self.head if self.options.shared_head else self.patch_head

    def _teacher_patch_head(self) -> nn.Module:
        return self.teacher_head if self.options.shared_head else self.teacher_patch_head

    def teacher_patch_temperature(self) -> float:
        o = self.options
        return teacher_temperature_at(int(self.steps_done), self.warmup_steps, o.warmup_teacher_patch_temperature,
                                      o.teacher_patch_temperature)

    def _encode_globals(self, vit: nn.Module, crops: list[torch.Tensor], mask: torch.Tensor | None) -> ViTOutput:
        """The ViT on the global crops (masked where ``mask`` [2n, L] is True), crop after crop in one output."""
        mask_token = None if mask is None else self.mask_token
        if self.options.encode_crops_jointly:
            return forward_vit(vit, torch.cat(crops), mask=mask, mask_token=mask_token)
        masks = [None] * len(crops) if mask is None else mask.chunk(len(crops))
        outputs = [forward_vit(vit, crop, mask=part, mask_token=mask_token) for crop, part in zip(crops, masks)]
        return ViTOutput(torch.cat([out.features for out in outputs]), torch.cat([out.tokens for out in outputs]),
                         outputs[0].num_prefix_tokens)

    def _class_targets(self, logits: torch.Tensor) -> torch.Tensor:
        """Teacher [CLS] distributions [2n, K]: centred and sharpened (DINO); records the global-batch mean."""
        total = all_reduce_sum(logits.float().sum(dim=0))
        self._batch_center = total / (logits.shape[0] * world_size())
        return F.softmax((logits.float() - self.center) / self.teacher_temperature(), dim=-1)

    def _patch_targets(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Teacher distributions [M, K] at the masked patches, from its patch tokens [2n, L, D]: centred by the patch
        centre and sharpened; records the global-batch mean over all patches (the authors' ``center2``) or, with
        ``patch_center: masked``, over the masked ones (the head then runs on those only)."""
        count, length, _ = patches.shape
        if self.options.patch_center == "masked":
            logits = self._teacher_patch_head()(patches[mask]).float()  # [M, K]
            sums = all_reduce_sum(torch.cat([logits.sum(dim=0), logits.new_tensor([logits.shape[0]])]))
            # No masked patch in the global batch: nothing to move the centre towards.
            self._batch_patch_center = sums[:-1] / sums[-1] if float(sums[-1]) > 0 else None
            return F.softmax((logits - self.patch_center) / self.teacher_patch_temperature(), dim=-1)
        logits = self._teacher_patch_head()(patches.reshape(count * length, -1)).view(count, length, -1).float()
        total = all_reduce_sum(logits.mean(dim=1).sum(dim=0))
        self._batch_patch_center = total / (count * world_size())
        return F.softmax((logits[mask] - self.patch_center) / self.teacher_patch_temperature(), dim=-1)

    def _regularisers(self, class_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted extra terms on the student's global class tokens [2n, D]; none in iBOT (DINOv2 adds KoLeo)."""
        return {}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        o = self.options
        crops = crops_in_order(batch)
        rows = crops[0].shape[0]
        mask = torch.cat([batch["mask/global0"], batch["mask/global1"]]).to(crops[0].device, torch.bool)  # [2n, L]
        vit = vit_backbone(self.encoder, self.key)
        with torch.no_grad():  # teacher first: its activations are freed before the student's graph is built
            teacher = self._encode_globals(vit_backbone(self.teacher_encoder, self.key), crops[:2], None)
            class_targets = self._class_targets(self.teacher_head(teacher.prefix[:, 0])).view(2, rows, -1)
            patch_targets = self._patch_targets(teacher.patches, mask)
        student = self._encode_globals(vit, crops[:2], mask)
        class_tokens = [student.prefix[:, 0]]
        if len(crops) > 2:
            class_tokens.append(encode_crops(lambda crop: forward_vit(vit, crop).prefix[:, 0], crops[2:],
                                             o.encode_crops_jointly))
        class_logits = self.head(torch.cat(class_tokens)).view(len(crops), rows, -1)
        dino = mean_over_processes(dino_loss_from_probabilities(class_logits, class_targets, o.student_temperature))
        patch_logits = self._student_patch_head()(student.patches[mask])
        ibot = mean_over_processes(ibot_patch_loss(patch_logits, patch_targets, mask, o.student_temperature))
        extras = self._regularisers(student.prefix[:, 0])
        loss = o.dino_loss_weight * dino + o.ibot_loss_weight * ibot + sum(extras.values())
        with torch.no_grad():
            entropy = -(class_targets * class_targets.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return {"loss": loss, "dino_loss": dino.detach(), "ibot_loss": ibot.detach(),
                **{name: value.detach() for name, value in extras.items()},
                "masked_fraction": mask.float().mean(), "embedding_std": embedding_std(student.prefix[:rows, 0]),
                "teacher_entropy": entropy, "teacher_temperature": loss.new_tensor(self.teacher_temperature())}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        super().before_optimizer_step(step, total_steps)  # the [CLS] head's last layer in the first epoch
        if not self.options.shared_head and step < self.freeze_last_layer_steps:
            for parameter in self.patch_head.last_layer.parameters():
                parameter.grad = None

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)  # teacher backbone and [CLS] head EMA, [CLS] centre, step clock
        if not self.options.shared_head:
            momentum = momentum_at(step, total_steps, self.options.momentum, self.options.final_momentum)
            ema_update_(self.teacher_patch_head, self.patch_head, momentum)
        if self._batch_patch_center is not None:
            self.patch_center.lerp_(self._batch_patch_center.to(self.patch_center.dtype),
                                    1.0 - self.options.patch_center_momentum)
            self._batch_patch_center = None
