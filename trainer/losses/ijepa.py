"""I-JEPA's loss (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", sec. 3, eq. 1): the distance, in representation space, between the predictor's outputs for the
patches of each target block and the target encoder's (layer-normed) outputs at those patches.

    L = 1/(M n T D) sum_{i, j, t} || s^_{i j t} - s_{i j t} ||^2

over M target blocks of n images, T patches per block and D feature dimensions: the paper's squared L2 distance
averaged over blocks and patches, divided by the constant D (a mean squared error per element). The authors'
released code uses a smooth L1 loss instead (``F.smooth_l1_loss``, beta 1); ``kind="smooth_l1"`` gives it.

The function knows nothing of processes: ``reduce_mean`` maps this caller's mean to the mean over every holder of
a part of the batch (the objective passes an all-gather-and-mean with gradient); the identity for the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]
IJEPA_LOSSES = ("l2", "smooth_l1")


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def ijepa_loss(predictions: torch.Tensor, targets: torch.Tensor, kind: str = "l2",
               reduce_mean: Reduce = _identity) -> torch.Tensor:
    """I-JEPA's prediction loss, averaged over every element.

    Args:
        predictions: [..., D] the predictor's outputs at the target patches, e.g. [M, n, T, D]; gradient flows here.
        targets: the same shape: the target encoder's layer-normed patch outputs at those patches (no gradient).
        kind: "l2" (the paper's squared L2 distance, per element: MSE) or "smooth_l1" (the authors' code, beta 1).
        reduce_mean: this caller's mean -> the mean over the global batch (identity for the whole batch).
    Returns:
        Scalar float32 loss.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
    if kind not in IJEPA_LOSSES:
        raise ValueError(f"kind must be one of {IJEPA_LOSSES}, got {kind!r}")
    predictions, targets = predictions.float(), targets.detach().float()
    loss = F.mse_loss(predictions, targets) if kind == "l2" else F.smooth_l1_loss(predictions, targets)
    return reduce_mean(loss)
