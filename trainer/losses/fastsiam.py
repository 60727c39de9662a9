"""FastSiam's loss (Pototzky et al. 2022, "FastSiam: Resource-Efficient Self-supervised Learning on a Single
GPU"): SimSiam's negative cosine with a target per view that is the mean of the OTHER views' projections, so
each target averages out more of the augmentation noise than a single view. Pure function of tensors.
"""
from __future__ import annotations

import torch

from trainer.losses.noncontrastive import negative_cosine


def fastsiam_loss(predictions: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """(1/V) sum_i D(p_i, mean_{j != i} stopgrad(z_j)), D the negative cosine of SimSiam, averaged over the batch.

    Args:
        predictions: [V, N, D] predictor outputs of the V >= 2 views (gradient flows here).
        projections: [V, N, D] projections of the same views; detached here (the stop-gradient).
    Returns:
        A scalar in [-1, 1] (-1 when every prediction points along the mean of the other views).
    """
    if predictions.dim() != 3 or predictions.shape != projections.shape or predictions.shape[0] < 2:
        raise ValueError(f"fastsiam_loss expects predictions and projections [V >= 2, N, D] of one shape, got "
                         f"{tuple(predictions.shape)} and {tuple(projections.shape)}")
    views = predictions.shape[0]
    projections = projections.detach()
    others = (projections.sum(dim=0, keepdim=True) - projections) / (views - 1)  # [V, N, D]
    return sum(negative_cosine(predictions[i], others[i]) for i in range(views)) / views
