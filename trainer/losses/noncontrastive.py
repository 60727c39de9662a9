"""Losses without negatives: SimSiam's negative cosine, BYOL's normalised MSE and Barlow Twins' redundancy
reduction. Pure functions of tensors; the callers handle stop-gradients and cross-process gathering.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BATCH_NORM_EPS = 1e-5  # nn.BatchNorm1d's default: barlow_twins equals BN(affine=False) in training mode


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -<p / ||p||, z / ||z||>, averaged over the batch (Chen & He 2021, eq. 1).

    Args:
        p: predictor outputs [N, D].
        z: projections of the other view [N, D]; the caller passes ``z.detach()`` (the stop-gradient).
    Returns:
        A scalar in [-1, 1]; the symmetric SimSiam loss is (D(p1, z2) + D(p2, z1)) / 2.
    """
    return -F.cosine_similarity(p, z, dim=1).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE ||p / ||p|| - z / ||z||||^2 = 2 - 2 cos(p, z), averaged over the batch
    (Grill et al. 2020, eq. 2).

    Args:
        p: online predictions [N, D].
        z: target projections of the other view [N, D] (computed under no_grad by the caller).
    Returns:
        A scalar in [0, 4]; BYOL's total loss is byol_loss(p1, z2) + byol_loss(p2, z1).
    """
    return (2.0 - 2.0 * F.cosine_similarity(p, z, dim=1)).mean()


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5.1e-3) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1-2): sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.

    C = z1_hat^T z2_hat / N is the cross-correlation of the two views' embeddings, each standardised per
    dimension over the batch: z_hat = (z - mean) / sqrt(var + eps) with the biased variance and
    eps = 1e-5. That is exactly ``nn.BatchNorm1d(D, affine=False)`` in training mode, which the paper's
    code applies before ``c = bn(z1).T @ bn(z2) / N``; so C_ii is the Pearson correlation of dimension i
    across views (up to eps). Pass the global batch (gathered across processes with gradient): the
    statistics and C are then those of the whole batch, as with the paper's SyncBN and all-reduced C.

    Args:
        z1, z2: projector outputs of the two views [N, D], N >= 2, rows aligned (row b of each is image b).
        lambd: weight of the off-diagonal (redundancy) term; 5.1e-3 is the paper's value for D = 8192.
    Returns:
        A scalar (0 only when C is the identity).
    """
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise ValueError(f"barlow_twins needs two [N >= 2, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]

    def standardise(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + BATCH_NORM_EPS)

    c = standardise(z1).t() @ standardise(z2) / n
    on_diagonal = (torch.diagonal(c) - 1.0).pow(2).sum()
    off_mask = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    off_diagonal = c[off_mask].pow(2).sum()
    return on_diagonal + lambd * off_diagonal
