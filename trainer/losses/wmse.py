"""W-MSE (Ermolov et al. 2021, "Whitening for Self-Supervised Representation Learning").

The embeddings of each view are whitened (centred, then multiplied by the inverse Cholesky factor of their
covariance) within sub-batches of ``w_size`` images, so that no dimension collapses and dimensions are
decorrelated; the loss is then the MSE between the L2-normalised whitened embeddings of every pair of views,
2 - 2 cos. Sub-batches come from a random permutation of the batch, drawn afresh ``w_iter`` times.

Pure functions of tensors: the caller gathers the global batch and passes the permutations (drawn from a
generator seeded identically on every process, so every process whitens the same sub-batches).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cholesky whitening of a batch (Ermolov et al. 2021): W (x - mean), W = L^-1, L L^T = Sigma.

    Sigma is the unbiased covariance of ``x`` [n, D] (n - 1 in the denominator, as the authors' code),
    shrunk towards the identity as (1 - eps) Sigma + eps I (the code's ``w_eps``; 0 in the paper). The
    whitened rows have the identity as covariance (exactly, for eps = 0 and n > D). Computed in float64
    (a near-singular covariance makes a float32 Cholesky fail) and returned in float32.

    Args:
        x: [n, D] embeddings, n > D unless eps > 0.
        eps: shrinkage towards the identity, in [0, 1].
    Returns:
        [n, D] whitened embeddings.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"whiten needs [n >= 2, D] embeddings, got {tuple(x.shape)}")
    centred = x.double() - x.double().mean(dim=0)
    covariance = centred.t() @ centred / (x.shape[0] - 1)
    if eps:
        covariance = (1 - eps) * covariance + eps * torch.eye(x.shape[1], dtype=covariance.dtype,
                                                                 device=covariance.device)
    factor, info = torch.linalg.cholesky_ex(covariance)
    if int(info) != 0:
        raise ValueError(f"whiten: the covariance of {x.shape[0]} samples in {x.shape[1]} dimensions is not positive "
                         f"definite (need more samples than dimensions, or eps > 0)")
    # Row-wise W x = L^-1 x, i.e. solve L Y = X^T for Y.
    return torch.linalg.solve_triangular(factor, centred.t(), upper=False).t().float()


def normalised_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a/||a|| - b/||b||||^2 = 2 - 2 cos(a, b), averaged over rows [n, D] -> scalar."""
    return (2.0 - 2.0 * F.cosine_similarity(a, b, dim=-1)).mean()


def sub_batches(permutation: torch.Tensor, w_size: int) -> tuple[torch.Tensor, ...]:
    """Split a permutation of the N batch rows into max(1, N // w_size) sub-batches of (nearly) equal size.

    With N a multiple of ``w_size`` these are the paper's sub-batches of exactly ``w_size``; otherwise the
    remainder is spread over them (each gets w_size to 2 w_size - 1 rows) instead of being dropped, and a
    batch smaller than ``w_size`` is whitened as one sub-batch."""
    if w_size < 2:
        raise ValueError(f"w_size must be >= 2, got {w_size}")
    return torch.tensor_split(permutation, max(1, permutation.numel() // w_size))


def wmse(z: torch.Tensor, permutations: Sequence[torch.Tensor], w_size: int, eps: float = 0.0) -> torch.Tensor:
    """The W-MSE loss (Ermolov et al. 2021) of embeddings ``z`` [N, V, D] of V views of N images.

    For each permutation (``w_iter`` of them): the rows are split into sub-batches (``sub_batches``); in each
    sub-batch, each view's embeddings are whitened on their own (``whiten``); then the normalised MSE is
    averaged over the images and summed over the V (V - 1) / 2 pairs of views. The result is averaged over
    permutations and pairs, as the authors' code.

    Args:
        z: [N, V, D] embeddings (the global batch), V >= 2.
        permutations: one [N] index tensor per whitening iteration (on z's device).
        w_size: sub-batch size (128 for CIFAR in the paper, with D = 64).
        eps: covariance shrinkage, see ``whiten``.
    Returns:
        A scalar in [0, 4].
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"wmse needs embeddings [N, views >= 2, D], got {tuple(z.shape)}")
    if not permutations:
        raise ValueError("wmse needs at least one permutation (w_iter >= 1)")
    views = z.shape[1]
    total = z.new_zeros((), dtype=torch.float32)
    for permutation in permutations:
        # Rows stay in permuted order: the pair losses are means over images, the same in any row order.
        whitened = torch.cat([torch.stack([whiten(z[rows, v], eps) for v in range(views)], dim=1)
                              for rows in sub_batches(permutation, w_size)])
        for i in range(views - 1):
            for j in range(i + 1, views):
                total = total + normalised_mse(whitened[:, i], whitened[:, j])
    return total / (len(permutations) * views * (views - 1) // 2)
