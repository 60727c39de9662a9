"""Decoupled contrastive losses (Yeh et al. 2022, "Decoupled Contrastive Learning"): pure functions of embeddings.

NT-Xent's gradient for one anchor carries a factor 1 - p+ (p+ the softmax probability of the positive), which
shrinks when the batch is small or the positive is easy: the "negative-positive coupling". DCL removes
the positive from the denominator (the paper's eq. 6, as in lightly's DCLLoss), for anchor z_i^(k) of view k:

    L_i^(k) = -w_i <z_i^(1), z_i^(2)> / tau + log sum_{l in {1, 2}, j != i} exp(<z_i^(k), z_j^(l)> / tau)

i.e. the 2N - 2 other views of the batch are the negatives, as in NT-Xent, and the positive appears only in
the numerator. ``dcl`` has w_i = 1; ``dclw`` (DCLW) weights the positive term by the negative von
Mises-Fisher weighting w_i = 2 - exp(<z_i^(1), z_i^(2)> / sigma) / mean_j exp(<z_j^(1), z_j^(2)> / sigma), a
constant (no gradient) that is > 1 for hard positives (low alignment) and < 1 for easy ones; its mean is 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nce_family import two_view_similarities


def von_mises_fisher_weights(z1: torch.Tensor, z2: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """DCLW's weights w_i = 2 - N softmax_i(<z1_i, z2_i> / sigma), detached.

    Args:
        z1, z2: [N, D] embeddings of two views (row i of each is a positive pair); normalised here.
        sigma: the vMF concentration's inverse (paper 0.5).
    Returns:
        [N] weights, no gradient; they average to 1 over the batch.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    alignment = (F.normalize(z1.detach(), dim=1) * F.normalize(z2.detach(), dim=1)).sum(dim=1)
    # N softmax_i(s / sigma) = exp(s_i / sigma) / mean_j exp(s_j / sigma): the paper's expectation over the batch.
    return 2.0 - z1.shape[0] * torch.softmax(alignment / sigma, dim=0)


def dcl(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
        positive_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The decoupled contrastive loss symmetric: the mean of L_i^(k) over all 2N anchors.

    Args:
        z1, z2: [N, D] embeddings of view 1 and view 2, N >= 2 (row i of each is a positive pair); normalised here.
        temperature: tau (paper 0.1).
        positive_weights: [N] weights w_i of the positive term (DCLW), the same for both anchors of pair i;
            None for plain DCL (all 1).
    Returns:
        Scalar loss. Each anchor has its positive in the numerator only and 2N - 2 negatives in the denominator.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"dcl expects two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"dcl needs at least 2 pairs (the negatives are the other pairs), got {n}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Decoupling: the anchor and its positive are both outside the 2N - 2 negatives of the denominator.
    positive, negatives = two_view_similarities(z1, z2)
    positive = positive / temperature
    if positive_weights is not None:
        if positive_weights.shape != (n,):
            raise ValueError(f"positive_weights must be [{n}], got {tuple(positive_weights.shape)}")
        positive = positive * torch.cat([positive_weights, positive_weights]).to(positive.dtype)
    return (torch.logsumexp(negatives / temperature, dim=1) - positive).mean()


def dclw(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, sigma: float = 0.5) -> torch.Tensor:
    """DCLW: ``dcl`` with the positive term weighted by ``von_mises_fisher_weights(z1, z2, sigma)``.

    Args:
        z1, z2: [N, D] embeddings of two views, N >= 2; temperature: tau (paper 0.1); sigma: paper 0.5.
    Returns:
        Scalar loss.
    """
    return dcl(z1, z2, temperature, von_mises_fisher_weights(z1, z2, sigma))
