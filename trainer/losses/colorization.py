"""Colorization losses (Zhang, Isola & Efros 2016, "Colorful Image Colorization"): multinomial cross-entropy
over quantised ab bins with soft targets, and the class-rebalancing weights of section 2.2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def colorization_loss(logits: torch.Tensor, targets: torch.Tensor, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's eq. 2, averaged over pixels instead of summed:

        L = mean_{n,p} v_{n,p} * ( - sum_q Z_{n,p,q} log softmax(logits)_{n,p,q} )

    Args:
        logits: [N, P, Q] scores of P pixels over Q ab bins.
        targets: [N, P, Q] soft-encoded ground truth Z (rows sum to 1).
        pixel_weights: [N, P] rebalancing weights v (the weight of each pixel's most likely target bin);
            None -> 1.
    Returns:
        Scalar loss.
    """
    if logits.shape != targets.shape or logits.dim() != 3:
        raise ValueError(f"colorization_loss: logits and targets must both be [N, P, Q], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    per_pixel = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)  # [N, P]
    if pixel_weights is not None:
        if pixel_weights.shape != per_pixel.shape:
            raise ValueError(f"colorization_loss: pixel_weights must be [N, P] = {tuple(per_pixel.shape)}, "
                             f"got {tuple(pixel_weights.shape)}")
        per_pixel = per_pixel * pixel_weights
    return per_pixel.mean()


def smoothed_prior(counts: torch.Tensor, bins: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """The empirical bin distribution p = counts / sum, smoothed by a Gaussian of width ``sigma`` (ab units) over
    the bin centres ``bins`` [Q, 2] (the paper's p~ = G_sigma * p), renormalised. All-zero counts -> uniform."""
    total = counts.sum()
    if total <= 0:
        return torch.full_like(counts, 1.0 / counts.numel())
    squared = ((bins[:, None, :] - bins[None, :, :]) ** 2).sum(-1)
    kernel = torch.exp(-squared / (2.0 * sigma ** 2)).to(counts)
    kernel = kernel / kernel.sum(dim=0, keepdim=True)  # each bin spreads its mass, preserving the total
    smoothed = kernel @ (counts / total)
    return smoothed / smoothed.sum()


def rebalancing_weights(prior: torch.Tensor, mix: float = 0.5) -> torch.Tensor:
    """Section 2.2: w proportional to ((1 - mix) p~ + mix / Q)^-1, normalised so that E_{p~}[w] = sum_q p~_q w_q = 1.

    Args:
        prior: [Q] smoothed bin distribution p~ (sums to 1). mix: lambda (0.5 in the paper).
    Returns:
        [Q] per-bin weights.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"rebalancing_weights: mix must be in [0, 1], got {mix}")
    weights = 1.0 / ((1.0 - mix) * prior + mix / prior.numel())
    return weights / (prior * weights).sum()
