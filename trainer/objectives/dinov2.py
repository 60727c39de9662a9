"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision").

iBOT (``trainer.objectives.ibot``: DINO on the class tokens of every crop + masked patch self-distillation on the
block-wise masked global crops, mask tokens inside the encoder, EMA teacher) with what DINOv2 changes (sec. 4):

* untied heads: one DINO head for the class tokens, another iBOT head for the patch tokens;
* Sinkhorn-Knopp centring of the teacher (3 iterations, SwAV's, at epsilon = the teacher temperature) for both
  the class and the masked patch targets, instead of the EMA centres (``trainer.losses.ibot.sinkhorn_teacher``);
  ``centering: centering`` keeps iBOT's EMA centres (the authors' default config; the patch centre is iBOT's
  mean over all patches, where the authors' DINOv2 code averages the masked ones);
* the KoLeo regulariser (``trainer.losses.koleo``) on the student's class tokens of each global crop (the
  backbone's, before the head), weight 0.1, summed over the two crops (the authors' ``koleo_loss``);
* the authors' masking: ratio r ~ U(0.1, 0.5) with probability 0.5, blocks of 4 patches to half the grid;
* loss weights dino 1, ibot 1, koleo 0.1; teacher momentum 0.992 -> 1; one teacher temperature (0.04 -> 0.07)
  for class and patch targets; crops 2 x (0.32-1) + 8 x (0.05-0.32).

Register tokens (Darcet et al. 2024) are a backbone option (``register_tokens``): the class token is
``prefix[:, 0]`` and the patch tokens exclude the registers, so they change nothing here.

Implementation choices: Sinkhorn's sums and maximum are all-reduced (the patch targets over every process's
masked patches, their count all-reduced), and KoLeo is computed on the class tokens gathered over processes, so
2 processes give the loss and gradients of 1 (the authors apply KoLeo per GPU, which makes it depend on the
number of processes). Masks are drawn per crop in the data workers, where the authors stratify the ratios over
each batch in the collate function (half the batch masked, ratios spread over [0.1, 0.5]); the expectation is
the same. With Sinkhorn-Knopp the EMA centre buffers inherited from iBOT are not used (they stay at zero; they
serve ``centering: centering``). Not used, as for DINO and iBOT here: the weight-decay schedule (0.04 -> 0.4;
0.2 for ViT-L/14), layer-wise lr decay, the patch-embedding lr multiplier, drop path, LayerScale and the
square-root batch-size lr rule (the recipe sets the lr).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.distributed import (
    all_reduce_sum,
    gather_with_grad,
    max_over_processes,
    world_size,
)
from trainer.losses.ibot import sinkhorn_teacher
from trainer.losses.koleo import koleo

from .base import register
from .ibot import IBOT, IBOTOptions
from .options import require_at_least, require_non_negative

CENTERINGS = ("sinkhorn_knopp", "centering")


@dataclass
class DINOv2Options(IBOTOptions):
    out_dim: int = 65536                         # DINO head prototypes (paper 65536; 131072 for ViT-L/g)
    patch_out_dim: int = 65536                   # iBOT head prototypes
    shared_head: bool = False                    # untied DINO and iBOT heads
    momentum: float = 0.992
    centering: str = "sinkhorn_knopp"            # sinkhorn_knopp (paper) | centering (iBOT's EMA centres)
    sinkhorn_iterations: int = 3
    koleo_loss_weight: float = 0.1
    min_mask_block: int | None = 4
    max_mask_block_ratio: float = 0.5
    num_local_crops: int = 8
    global_crop_scale: tuple = (0.32, 1.0)
    local_crop_scale: tuple = (0.05, 0.32)

    def __post_init__(self):
        super().__post_init__()
        if self.centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {', '.join(CENTERINGS)}, got {self.centering!r}")
        require_at_least(self, 1, "sinkhorn_iterations")
        require_non_negative(self, "koleo_loss_weight")


@register
class DINOv2(IBOT):
    key = "dinov2"
    Options = DINOv2Options

    def _class_targets(self, logits: torch.Tensor) -> torch.Tensor:
        if self.options.centering == "centering":
            return super()._class_targets(logits)
        return sinkhorn_teacher(logits, self.teacher_temperature(), self.options.sinkhorn_iterations,
                                all_reduce_sum, max_over_processes, logits.shape[0] * world_size())

    def _patch_targets(self, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sinkhorn-Knopp over the masked patches of the global batch; the teacher head runs on those only."""
        if self.options.centering == "centering":
            return super()._patch_targets(patches, mask)
        logits = self._teacher_patch_head()(patches[mask])
        total = int(all_reduce_sum(mask.sum().reshape(1)).item())  # masked patches over every process
        if total == 0:  # the same on every process: no targets, no collectives
            return logits.float()
        return sinkhorn_teacher(logits, self.teacher_patch_temperature(), self.options.sinkhorn_iterations,
                                all_reduce_sum, max_over_processes, total)

    def _regularisers(self, class_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """KoLeo within each global crop's class tokens over the global batch (not between crops of one image)."""
        weight = self.options.koleo_loss_weight
        if weight == 0:
            return {}
        return {"koleo": weight * sum(koleo(gather_with_grad(tokens)) for tokens in class_tokens.chunk(2))}
