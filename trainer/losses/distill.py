"""Distillation of a teacher's embeddings through a queue of teacher embeddings (LightlyTrain's ``distillation``).

LightlyTrain (``lightly_train._methods.distillation`` / ``distillationv3``, docs "Distillation: What's under the
hood"): the L2-normalised teacher embeddings of recent batches form a queue that serves as pseudo classification
weights. Teacher and student embeddings are both scored against it, and the student's softmax over the queue is
pulled to the teacher's by KL divergence, as in Hinton et al. 2015 ("Distilling the Knowledge in a Neural
Network"): soft targets at a temperature, here over "classes" made of teacher embeddings rather than labels.

    p_t = softmax(t Q^T / tau),  log p_s = log_softmax(s Q^T / tau),  loss = mean_i KL(p_t,i || p_s,i)

LightlyTrain computes it with ``KLDivLoss(reduction="batchmean")``: summed over the queue, averaged over the batch,
without Hinton's tau^2 factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def queue_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """KL divergence of the student's distribution over the queue from the teacher's, averaged over the batch.

    Args:
        student: [B, D] L2-normalised student embeddings, projected into the teacher's space (with gradient).
        teacher: [B, D] L2-normalised teacher embeddings of the same images (targets; no gradient flows to them).
        queue: [K, D] L2-normalised teacher embeddings of this and earlier batches (constants), K >= 1.
        temperature: tau > 0 of both softmaxes (LightlyTrain: 0.07).
    Returns:
        Scalar: sum_k p_t log(p_t / p_s) over the queue, mean over the B rows.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be [B, D]")
    if queue.dim() != 2 or queue.shape[0] < 1 or queue.shape[1] != student.shape[1]:
        raise ValueError(f"queue must be [K >= 1, {student.shape[1]}], got {tuple(queue.shape)}")
    queue = queue.detach()
    teacher_log_p = F.log_softmax(teacher.detach() @ queue.T / temperature, dim=1)
    student_log_p = F.log_softmax(student @ queue.T / temperature, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=1).mean()
