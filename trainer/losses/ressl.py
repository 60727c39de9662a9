"""ReSSL's relational loss (Zheng et al. 2021, "ReSSL: Relational Self-Supervised Learning with Weak
Augmentation"): a pure function of embeddings.

The relation of an image to a memory queue of K earlier teacher embeddings is the softmax of its cosines to
them. The teacher's relation (EMA network, weakly augmented view, sharp temperature tau_t) is the target of the
student's (online network, strongly augmented view, tau_s): loss = H(p_t, p_s) = KL(p_t || p_s) + H(p_t)
(the teacher's entropy is a constant for the student, so the gradient is the KL's). Unlike InfoNCE there is no
positive: the two views never meet directly, only through their relations to the queue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ressl(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, student_temperature: float = 0.1,
          teacher_temperature: float = 0.04) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's relation to the queue, mean over the batch.

    Args:
        student: [N, D] online embeddings (strong view); teacher: [N, D] target embeddings (weak view, used
            without gradient); queue: [K, D] earlier teacher embeddings (no gradient). All normalised here.
        student_temperature: tau_s (paper 0.1); teacher_temperature: tau_t (paper 0.04, sharper than tau_s).
    Returns:
        Scalar -sum_k p_t(k) log p_s(k), averaged over the N rows.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"expected student and teacher of one [N, D] shape, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if queue.dim() != 2 or queue.shape[1] != student.shape[1]:
        raise ValueError(f"queue must be [K, {student.shape[1]}], got {tuple(queue.shape)}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got {student_temperature} and {teacher_temperature}")
    queue = F.normalize(queue.detach(), dim=1).to(student.dtype)
    student_logits = F.normalize(student, dim=1) @ queue.t() / student_temperature
    with torch.no_grad():
        target = torch.softmax(F.normalize(teacher, dim=1) @ queue.t() / teacher_temperature, dim=1)
    return -(target * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
