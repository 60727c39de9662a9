"""AIM's autoregressive pixel loss (El-Nouby et al. 2024, "Scalable Pre-training of Large Autoregressive Image
Models", sec. 3).

The image is a raster-order sequence of L patches; the output at position k predicts patch k + 1 (the next
patch), so predictions and targets are offset by one. With a prefix of S patches (bidirectional attention), the
loss covers only the non-prefix patches S + 1, ..., L (1-based), K - S of them, each image's mean taken over its
own scored patches:

    l(image) = 1 / (L - S) * sum_{k > S} mean_pixels (x_hat_k - x_k) ** 2

and the batch loss is the mean over images. The targets are the per-patch normalised pixels (the paper's
default; ``trainer.models.vit.normalise_patches``). The paper writes the squared l2 norm summed over a patch's
pixels; the mean over them used here differs by the constant factor 1 / (p * p * C).
"""
from __future__ import annotations

import torch


def non_prefix_mask(prefix_lengths: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Which patches AIM scores: patch j (0-based, raster order) iff j >= S, the patches after the prefix.

    Args:
        prefix_lengths: int [N], S of each image, in [0, L].
        num_patches: L.
    Returns:
        bool [N, L].
    """
    positions = torch.arange(num_patches, device=prefix_lengths.device)
    return positions.unsqueeze(0) >= prefix_lengths.reshape(-1, 1)


def aim_loss(predictions: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-patch mean squared error over the scored patches (AIM eq. 2 with the prefix of sec. 3).

    Args:
        predictions: [N, L, P], the head's output at every position; position k predicts patch k + 1, so the
            last position's prediction is unused.
        targets: [N, L, P], each patch's (normalised) pixels, raster order.
        loss_mask: bool [N, L] over the TARGET patches, True where a patch is scored (``non_prefix_mask``); patch 0
            has nothing before it and is never scored, whatever ``loss_mask[:, 0]`` says.
    Returns:
        A scalar: the mean over images of each image's mean squared error over its scored patches (an image
        with no scored patch contributes 0). A mean of per-image terms, so averaging the gradients of equal
        local batches over processes gives the loss of the whole batch.
    """
    if predictions.shape != targets.shape or predictions.dim() != 3:
        raise ValueError(f"predictions and targets must both be [N, L, P], got {tuple(predictions.shape)} and "
                         f"{tuple(targets.shape)}")
    if loss_mask.shape != predictions.shape[:2]:
        raise ValueError(f"loss_mask must be [N, L] = {tuple(predictions.shape[:2])}, got {tuple(loss_mask.shape)}")
    # Shift by one: the output at k is compared with patch k + 1.
    errors = (predictions[:, :-1].float() - targets[:, 1:].float()).pow(2).mean(dim=-1)  # [N, L - 1]
    scored = loss_mask[:, 1:].to(torch.bool)
    per_image = torch.where(scored, errors, 0.0).sum(dim=1) / scored.sum(dim=1).clamp(min=1)
    return per_image.mean()
