"""Pixel-reconstruction losses of masked image modelling, scored on the masked patches only.

* ``masked_pixel_mse``: MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", sec. 3): the
  mean squared error between the predicted and the true pixels of each patch, averaged over the masked patches;
  with ``normalise_targets`` the target of each patch is its pixels standardised by the patch's own mean and
  variance (the paper's "normalized pixels", the authors' ``norm_pix_loss``).
* ``masked_pixel_l1``: SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling",
  sec. 3.4): the mean absolute error over the pixels (and channels) of the masked patches, raw-pixel targets.

Shapes: ``predictions`` and ``targets`` [N, L, P] (P = patch * patch * channels, e.g. from
``trainer.models.vit.patchify``), ``mask`` [N, L] bool or 0/1, True / 1 = masked (scored). Every patch has
the same P values, so SimMIM's sum over masked pixels divided by their count equals the mean over masked
patches of each patch's mean error, which is how both are computed here. Computed in float32 whatever the
input dtype (mixed precision).
"""
from __future__ import annotations

import torch

from trainer.models.vit import normalise_patches


def _check(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
    if predictions.dim() != 3 or predictions.shape != targets.shape:
        raise ValueError(f"predictions and targets must both be [N, L, P], got {tuple(predictions.shape)} and "
                         f"{tuple(targets.shape)}")
    if mask.shape != predictions.shape[:2]:
        raise ValueError(f"mask must be [N, L] = {tuple(predictions.shape[:2])}, got {tuple(mask.shape)}")


def _mean_over_masked(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``per_patch`` [N, L] over the masked patches; 0 when none is masked (no device sync)."""
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


def masked_pixel_mse(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     normalise_targets: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction loss: mean over the masked patches of the per-patch mean squared error.

    Args:
        predictions: [N, L, P] predicted pixels of every patch (the decoder's output, raster order).
        targets: [N, L, P] true pixels of every patch (of the image the encoder was given, normalised as it was).
        mask: [N, L] bool or 0/1, True / 1 where the patch was masked; only those are scored.
        normalise_targets: standardise each target patch by its own mean and variance
            (``trainer.models.vit.normalise_patches``, MAE's ``norm_pix_loss``, the paper's better setting).
        eps: added to the patch variance when normalising.
    Returns:
        A scalar: sum_{n,l} mask * mean_p (pred - target)^2 / sum_{n,l} mask.
    """
    _check(predictions, targets, mask)
    targets = targets.detach().float()
    if normalise_targets:
        targets = normalise_patches(targets, eps)
    per_patch = (predictions.float() - targets).pow(2).mean(dim=-1)
    return _mean_over_masked(per_patch, mask)


def masked_pixel_l1(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's reconstruction loss: the mean absolute error over the pixels and channels of the masked patches.

    Args:
        predictions: [N, L, P] predicted raw pixels of every patch (the linear head's output).
        targets: [N, L, P] the input image's pixels of every patch.
        mask: [N, L] bool or 0/1, True / 1 where the patch was masked; only those are scored.
    Returns:
        A scalar: sum_{n,l} mask * mean_p |pred - target| / sum_{n,l} mask.
    """
    _check(predictions, targets, mask)
    per_patch = (predictions.float() - targets.detach().float()).abs().mean(dim=-1)
    return _mean_over_masked(per_patch, mask)
