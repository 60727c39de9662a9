"""Masked patch self-distillation: iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer")
and the teacher targets of DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision").

* ``ibot_patch_loss``: the student's distribution at each masked patch of a global crop is trained to match the
  teacher's distribution at the same patch of the unmasked crop (iBOT eq. 2, the online tokenizer), averaged over
  each image's masked patches, then over the images (iBOT's ``iBOTLoss``, DINOv2's ``forward_masked``).
* ``dino_loss_from_probabilities``: DINO's cross-view loss (``trainer.losses.dino.dino_loss``) against given
  teacher distributions (iBOT's centred ones, DINOv2's Sinkhorn-Knopp ones) instead of teacher logits.
* ``sinkhorn_teacher``: DINOv2's ``sinkhorn_knopp_teacher``, the teacher's distributions with equal prototype
  marginals over the global batch (SwAV's ``trainer.losses.clustering.sinkhorn`` at epsilon = the teacher
  temperature); a part of the batch with no rows still takes part in every reduction.

The functions know nothing of processes: global-batch sums go through the ``reduce_*`` arguments.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .clustering import sinkhorn
from .dino import dino_loss

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def ibot_patch_loss(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor, mask: torch.Tensor,
                    student_temperature: float = 0.1) -> torch.Tensor:
    """iBOT's masked image modelling loss (sec. 3.2: L_MIM = -sum_i m_i P_t(u_i) log P_s(u_hat_i)).

    With m_n the number of masked patches of image n (N images, each a global crop),

        L = 1/N sum_n 1/max(m_n, 1) sum_{l masked in n} -sum_k P_t[n, l, k] log softmax(s[n, l] / tau_s)[k]

    so every image weighs the same whatever its masked count, and an image with no masked patch adds 0 (the
    authors' ``mask.sum(-1).clamp(min=1.0)`` and mean over the batch).

    Args:
        student_logits: [M, K] the student head's outputs at the masked patches, M = mask.sum(), in the order of
            ``tokens[mask]`` (image by image, raster order within an image); gradient flows here.
        teacher_probabilities: [M, K] the teacher's distributions at the same patches (centred and sharpened,
            or Sinkhorn-Knopp), targets without gradient.
        mask: [N, L] bool, True where the student's patch was replaced by the mask token.
        student_temperature: tau_s (0.1 in both papers).
    Returns:
        Scalar loss (0, with a graph, when nothing is masked).
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"ibot_patch_loss expects a bool mask [N, L], got {mask.dtype} {tuple(mask.shape)}")
    masked = int(mask.sum())
    if student_logits.dim() != 2 or student_logits.shape != teacher_probabilities.shape \
            or student_logits.shape[0] != masked:
        raise ValueError(f"ibot_patch_loss expects student and teacher [M, K] with M = {masked} masked patches, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probabilities.shape)}")
    image = mask.nonzero()[:, 0]  # the image of each masked patch, in tokens[mask] order
    weights = 1.0 / mask.sum(dim=1).clamp_min(1).float()
    log_probabilities = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    cross_entropy = -(teacher_probabilities.detach().float() * log_probabilities).sum(dim=-1)  # [M]
    return (cross_entropy * weights[image].to(cross_entropy.device)).sum() / mask.shape[0]


def dino_loss_from_probabilities(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                                 student_temperature: float = 0.1) -> torch.Tensor:
    """DINO's loss (``dino_loss``: mean over crop pairs (g, v), v != g, of the batch mean of
    -sum_k P_t(g)[k] log softmax(s_v / tau_s)[k]) with the teacher distributions P_t given.

    ``dino_loss`` takes teacher logits t, a centre c and a temperature T and uses softmax((t - c) / T); with
    t = log P_t, c = 0 and T = 1 that softmax is P_t itself (rows summing to 1), so the pairing stays in one place.

    Args:
        student_logits: [V, B, K], globals first; gradient flows here.
        teacher_probabilities: [G, B, K] distributions of the G global crops (rows sum to 1; no gradient).
        student_temperature: tau_s.
    """
    # Clamped at the smallest normal float: a probability that underflowed to 0 stays finite after the log.
    logits = teacher_probabilities.detach().float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return dino_loss(student_logits, logits, logits.new_zeros(logits.shape[-1]), student_temperature, 1.0)


@torch.no_grad()
def sinkhorn_teacher(logits: torch.Tensor, temperature: float, iterations: int = 3, reduce_sum: Reduce = _identity,
                     reduce_max: Reduce = _identity, total_samples: int | None = None) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp centring of the teacher (sec. 5, "Sinkhorn-Knopp centering"; the authors'
    ``sinkhorn_knopp_teacher``): Q = exp(logits / T), then ``iterations`` rounds of scaling every prototype's
    mass over the global batch to 1/K and every sample's to 1/B; rows are returned summing to 1.

    That is ``trainer.losses.clustering.sinkhorn`` with epsilon = T (its sums and maximum go through
    ``reduce_sum`` / ``reduce_max``). A part with no rows (a process whose crops have no masked patch, for
    the patch targets) runs the same reductions on a placeholder row whose every contribution is replaced by
    zero (sums) or -inf (the maximum), so the other parts see exactly the global batch and every process runs
    the same collectives.

    Args:
        logits: [b, K] this part's teacher head outputs (b may be 0).
        temperature: T, the teacher temperature (0.04 -> 0.07 in the paper).
        iterations: Sinkhorn-Knopp rounds (3 in the paper).
        reduce_sum, reduce_max: sum / maximum over every part of the batch; identity for one part.
        total_samples: B, rows over every part; None when this call holds the whole batch.
    Returns:
        [b, K] float32 distributions.
    """
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn_teacher expects logits [b, K], got {tuple(logits.shape)}")
    if logits.shape[0] > 0:
        return sinkhorn(logits, temperature, iterations, reduce_sum, reduce_max, total_samples)
    placeholder = logits.new_zeros(1, logits.shape[1])
    sinkhorn(placeholder, temperature, iterations, lambda t: reduce_sum(torch.zeros_like(t)),
             lambda t: reduce_max(torch.full_like(t, -float("inf"))), 1 if total_samples is None else total_samples)
    return logits.new_zeros(0, logits.shape[1], dtype=torch.float32)
