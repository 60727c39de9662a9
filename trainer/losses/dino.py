"""Self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"): the DINO cross-entropy between a centred, sharpened teacher and the student, and its
teacher-temperature warm-up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """DINO's loss (sec. 3.1, Algorithm 1 with multi-crop, as in the authors' ``DINOLoss``).

    P_t(g) = softmax((t_g - center) / teacher_temperature) for each teacher (global) crop g,
    P_s(v) = softmax(s_v / student_temperature) for each student crop v; the student's first G crops are the
    same global crops the teacher saw. The loss is the mean over pairs (g, v) with v != g of
    mean_batch( -sum_k P_t(g)[k] log P_s(v)[k] ).

    Args:
        student_logits: [V, B, K], V >= 2 crops (globals first, then locals); gradient flows here.
        teacher_logits: [G, B, K] for the G global crops (targets, no gradient).
        center: [K] (or [1, K]) running mean of teacher logits, subtracted before the teacher softmax.
        student_temperature, teacher_temperature: the softmax temperatures (0.1 and 0.04-0.07 in the paper).
    Returns:
        Scalar loss.
    """
    if student_logits.dim() != 3 or teacher_logits.dim() != 3 or student_logits.shape[1:] != teacher_logits.shape[1:]:
        raise ValueError(f"dino_loss expects student [V, B, K] and teacher [G, B, K], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    crops, teachers = student_logits.shape[0], teacher_logits.shape[0]
    if crops < 2 or teachers > crops:
        raise ValueError(f"dino_loss needs >= 2 student crops including the {teachers} teacher crops, got {crops}")
    teacher_probs = F.softmax((teacher_logits.detach().float() - center.reshape(1, 1, -1).float()) / teacher_temperature, dim=2)
    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=2)
    total, terms = student_logits.new_zeros((), dtype=torch.float32), 0
    for g in range(teachers):
        for v in range(crops):
            if v == g:
                continue
            total = total + (-(teacher_probs[g] * student_log_probs[v]).sum(dim=1)).mean()
            terms += 1
    return total / terms


def teacher_temperature_at(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warm-up of the teacher temperature from ``start`` at step 0 to ``end`` at ``warmup_steps``, then
    constant (DINO's ``warmup_teacher_temp`` -> ``teacher_temp`` over the first epochs), a pure function of
    the step. ``warmup_steps <= 0`` gives ``end`` throughout."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * max(step, 0) / warmup_steps
