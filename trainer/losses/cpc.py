"""Contrastive Predictive Coding loss over a grid of patch embeddings.

van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding" (sec. 3.3 on
images), and Hénaff et al. 2019, "Data-Efficient Image Recognition with CPC" (eq. 3 and Algorithm 1). The
context at grid row i, c_{i,j}, predicts the embedding k rows below, zhat_{i+k,j} = W_k c_{i,j}; the true
z_{i+k,j} is the positive and every other patch embedding of the batch (other positions of the same image,
all patches of the other images) is a negative:

    L = - mean_{k, n, i, j} log  exp(zhat_{i+k,j}^T z_{i+k,j}) / sum_l exp(zhat_{i+k,j}^T z_l)

with unnormalised dot products (no temperature), l running over all N * H * W patches. The mean is taken per
step k and then over the steps (the paper's code sums the per-step means: a constant factor), so a loss at
chance is log(N * H * W). Other directions (bottom-up, left-right) are this loss on a flipped or transposed
grid; the objective does that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cpc_logits(prediction: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels of one prediction step.

    prediction: [N, H - step, W, D], row i predicting ``targets[:, i + step]``; targets: [N, H, W, D].
    Returns logits [N * (H - step) * W, N * H * W] (each prediction against every patch of the batch, in
    ``targets.reshape(-1, D)`` order) and labels [N * (H - step) * W], the index of the true patch.
    """
    if targets.dim() != 4 or prediction.dim() != 4:
        raise ValueError(f"cpc: expected [N, H, W, D] grids, got prediction {tuple(prediction.shape)} and "
                         f"targets {tuple(targets.shape)}")
    n, rows, cols, dim = targets.shape
    if not 0 < step < rows or prediction.shape != (n, rows - step, cols, dim):
        raise ValueError(f"cpc: a step-{step} prediction of a {tuple(targets.shape)} target grid must have shape "
                         f"{(n, rows - step, cols, dim)}, got {tuple(prediction.shape)}")
    logits = prediction.reshape(-1, dim) @ targets.reshape(-1, dim).t()
    positions = torch.arange(n * rows * cols, device=targets.device).view(n, rows, cols)
    return logits, positions[:, step:, :].reshape(-1)


def cpc_loss(predictions: dict[int, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """CPC InfoNCE: the mean over steps k of the mean cross-entropy of each prediction against all patches.

    predictions: {k: [N, H - k, W, D]}, the prediction made at row i (all i < H - k) of the embedding at
    row i + k; targets: [N, H, W, D] patch embeddings z (the global batch: negatives are all N * H * W).
    Returns a scalar.
    """
    if not predictions:
        raise ValueError("cpc: no prediction steps")
    losses = [F.cross_entropy(*cpc_logits(prediction, targets, step))
              for step, prediction in sorted(predictions.items())]
    return torch.stack(losses).mean()
