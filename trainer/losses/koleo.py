"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; used by DINOv2).

The Kozachenko-Leonenko differential-entropy estimator turned into a loss: with x_i the L2-normalised rows
and rho_i = min_{j != i} ||x_i - x_j|| the distance of each row to its nearest other row,

    L = -1/n sum_i log(rho_i + eps)

which pushes every point away from its nearest neighbour, spreading the rows over the sphere. The nearest
neighbour is picked without gradient (the largest cosine, as DINOv2's ``KoLeoLoss``); the gradient flows
through the distance to it. Rows are compared within the tensor given: a caller wanting the global batch
gathers it first, DINOv2 applies it per process (per crop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean_i log(distance of normalised row i to its nearest other row + eps).

    Args:
        x: [n, D] embeddings, n >= 2 (any norm; each row is L2-normalised here).
        eps: keeps the log finite for duplicate rows (DINOv2: 1e-8).
    Returns:
        Scalar loss (lower: rows more spread out).
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo expects [n, D] with n >= 2 rows, got {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=1, eps=eps)
    with torch.no_grad():
        cosines = x @ x.t()
        cosines.fill_diagonal_(-float("inf"))  # a row is not its own neighbour
        nearest = cosines.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()
