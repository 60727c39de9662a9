"""SMoG's grouping and loss (Pang et al. 2022, "Unsupervised Visual Representation Learning by Synchronous
Momentum Grouping").

* ``assign_groups(features, groups)``: each instance's nearest group by cosine similarity.
* ``momentum_update_groups(groups, features, assignments, beta)``: every group that received instances moves to
  beta * g + (1 - beta) * (mean of its instances); the others stay. The per-group sums and counts go through
  ``reduce_sum`` (the caller's all-reduce), so several processes holding parts of a batch get the update of one
  process holding all of it.
* ``smog_loss(predictions, groups, assignments)``: the group-level contrast, a cross-entropy over the groups
  of softmax(cos(prediction, group) / tau) to the assigned group.
Pure functions of tensors.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def assign_groups(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The index of the most similar group (cosine) of each instance: features [N, D], groups [K, D] -> [N] int64."""
    if features.dim() != 2 or groups.dim() != 2 or features.shape[1] != groups.shape[1]:
        raise ValueError(f"assign_groups expects features [N, D] and groups [K, D], got {tuple(features.shape)} "
                         f"and {tuple(groups.shape)}")
    return (F.normalize(features.float(), dim=1) @ F.normalize(groups.float(), dim=1).t()).argmax(dim=1)


@torch.no_grad()
def momentum_update_groups(groups: torch.Tensor, features: torch.Tensor, assignments: torch.Tensor, beta: float,
                           reduce_sum: Reduce = _identity) -> torch.Tensor:
    """SMoG's momentum grouping: g_k <- beta g_k + (1 - beta) mean{x_i : a_i = k} for every group with instances.

    Args:
        groups: [K, D] group features.
        features: [N, D] instance features (this part of the batch; no gradient is kept).
        assignments: [N] int64 group of each instance (``assign_groups``).
        beta: momentum of the group features in [0, 1] (0.99 in the paper).
        reduce_sum: the sum of a tensor over every holder of a part of the batch (the caller's all-reduce);
            the identity when ``features`` is the whole batch.
    Returns:
        New [K, D] group features (the input is not modified).
    """
    if features.dim() != 2 or groups.dim() != 2 or features.shape[1] != groups.shape[1]:
        raise ValueError(f"momentum_update_groups expects groups [K, D] and features [N, D], got "
                         f"{tuple(groups.shape)} and {tuple(features.shape)}")
    if assignments.shape != (features.shape[0],):
        raise ValueError(f"assignments must be [N={features.shape[0]}], got {tuple(assignments.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    count, dim = groups.shape
    # Sums and counts in one tensor: one collective per update.
    totals = features.new_zeros(count, dim + 1, dtype=torch.float32)
    totals.index_add_(0, assignments, torch.cat([features.float(), features.new_ones(features.shape[0], 1,
                                                                                     dtype=torch.float32)], dim=1))
    totals = reduce_sum(totals)
    sums, counts = totals[:, :dim], totals[:, dim:]
    means = sums / counts.clamp_min(1.0)
    updated = beta * groups.float() + (1.0 - beta) * means
    return torch.where(counts > 0, updated, groups.float()).to(groups.dtype)


def smog_loss(predictions: torch.Tensor, groups: torch.Tensor, assignments: torch.Tensor,
              temperature: float = 0.1) -> torch.Tensor:
    """Group-level contrast: mean over instances of -log softmax_k(cos(p_i, g_k) / tau)[a_i].

    Args:
        predictions: [N, D] online predictions (gradient flows here).
        groups: [K, D] group features (constants).
        assignments: [N] int64 target group of each instance (that of its other view).
        temperature: tau (0.1 in the paper).
    Returns:
        Scalar loss.
    """
    if predictions.dim() != 2 or groups.dim() != 2 or predictions.shape[1] != groups.shape[1]:
        raise ValueError(f"smog_loss expects predictions [N, D] and groups [K, D], got {tuple(predictions.shape)} "
                         f"and {tuple(groups.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = F.normalize(predictions.float(), dim=1) @ F.normalize(groups.detach().float(), dim=1).t()
    return F.cross_entropy(logits / temperature, assignments)
