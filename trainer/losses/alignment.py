"""Alignment and uniformity of embeddings on the hypersphere (Wang & Isola 2020, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere", eqs. 4-5). Used both as a
training objective and as a diagnostic of any embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """L_align(alpha) = E_{(x, y) positive pairs} ||f(x) - f(y)||_2^alpha.

    Args:
        x, y: [N, D]; row i of x and row i of y are a positive pair. L2-normalised here.
        alpha: > 0 (the paper's default 2).
    Returns:
        Scalar in [0, 2^alpha]; 0 when every pair coincides.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"alignment expects two [N, D] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    difference = F.normalize(x, dim=1) - F.normalize(y, dim=1)
    if alpha == 2:
        # The squared norm directly: smooth everywhere (the norm's gradient at a coinciding pair is 0/0).
        return difference.pow(2).sum(dim=1).mean()
    return difference.norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """L_uniform(t) = log E_{x != y i.i.d.} exp(-t ||f(x) - f(y)||_2^2), over the N(N-1)/2 distinct pairs.

    Args:
        x: [N, D] with N >= 2; L2-normalised here.
        t: > 0 (the paper's default 2).
    Returns:
        Scalar in [-4t, 0]: 0 when all points coincide, lower is more uniform.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs [N, D] with N >= 2, got {tuple(x.shape)}")
    z = F.normalize(x, dim=1)
    n = z.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1, device=z.device)
    # ||a - b||^2 = 2 - 2 a.b for unit vectors; clamped against rounding below 0.
    squared = (2.0 - 2.0 * (z @ z.t())[rows, cols]).clamp_min(0.0)
    return torch.logsumexp(-t * squared, dim=0) - torch.log(torch.tensor(float(squared.numel()), device=z.device))
