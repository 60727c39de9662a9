"""TiCo (Zhu, Moraes, Karakulak, Sobol, Canziani & LeCun 2022, "TiCo: Transformation Invariance and Covariance
Contrast for Self-Supervised Visual Representation Learning"), eq. 4-5 and Algorithm 1.

With z the L2-normalised embeddings of the online branch and z' those of the other branch,
    C_t = beta C_{t-1} + (1 - beta) (1 / N) sum_i z_i z_i^T        (EMA of the covariance, beta = 0.9)
    L   = -(1 / N) sum_i z_i . z'_i + rho (1 / N) sum_i z_i^T C_t z_i   (rho = 8)
C_t uses this batch (the updated value) and is treated as a constant (the batch term is detached), as in
the authors' pseudo-code and lightly's ``TiCoLoss``. The state C is passed in and returned: the caller keeps it
(a registered buffer) and gathers the global batch first, so C and the loss are those of the whole batch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TiCoTerms(NamedTuple):
    loss: torch.Tensor            # the total
    invariance: torch.Tensor      # -mean cos(z, z')
    covariance: torch.Tensor      # mean z^T C_t z (unweighted)
    new_covariance: torch.Tensor  # C_t [D, D], detached: the next step's C_{t-1}


def tico(z1: torch.Tensor, z2: torch.Tensor, covariance: torch.Tensor, rho: float = 8.0,
         beta: float = 0.9) -> TiCoTerms:
    """TiCo's loss for one step.

    Args:
        z1: [N, D] online-branch embeddings (not yet normalised; gradient flows here).
        z2: [N, D] embeddings of the other view, rows aligned (the momentum branch's: pass them without grad).
        covariance: [D, D] C_{t-1} (zeros at the start).
        rho: weight of the covariance-contrast term (paper 8).
        beta: EMA coefficient of C (paper 0.9); 0 uses only this batch's covariance.
    Returns:
        ``TiCoTerms`` (loss, invariance, covariance term, C_t).
    """
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 1:
        raise ValueError(f"tico needs two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if covariance.shape != (z1.shape[1], z1.shape[1]):
        raise ValueError(f"tico: covariance {tuple(covariance.shape)} does not match D = {z1.shape[1]}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"tico: beta must be in [0, 1), got {beta}")
    u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    batch_covariance = (u1.t() @ u1).detach() / u1.shape[0]
    new_covariance = beta * covariance.detach().float() + (1.0 - beta) * batch_covariance
    invariance = -(u1 * u2).sum(dim=1).mean()
    contrast = ((u1 @ new_covariance) * u1).sum(dim=1).mean()
    return TiCoTerms(invariance + rho * contrast, invariance, contrast, new_covariance)
