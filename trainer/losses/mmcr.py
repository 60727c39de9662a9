"""Maximum Manifold Capacity Representations (Yerxa et al. 2023, "Learning Efficient Coding of Natural Images
with Maximum Manifold Capacity Representations").

Each image's k views, embedded and L2-normalised, form a point cloud (its "manifold") whose mean is the
image's centroid. MMCR maximises the nuclear norm (sum of singular values) of the matrix of centroids, which
is large when centroids are long (the views agree) and spread over many orthogonal directions (the images
differ); optionally it also shrinks each image's own view matrix (lambda > 0). Pure functions of tensors;
the caller gathers the embeddings of every process, since the centroid matrix spans the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nuclear_norm(matrices: torch.Tensor) -> torch.Tensor:
    """The nuclear norm ||A||_* = sum of singular values of each matrix in ``matrices`` [..., m, n] -> [...].

    Computed in float32 at least (SVD has no half-precision kernels); differentiable (d||A||_*/dA = U V^T
    where the singular values are distinct and non-zero)."""
    return torch.linalg.svdvals(matrices.float() if matrices.dtype in (torch.float16, torch.bfloat16)
                                else matrices).sum(-1)


def mmcr(z: torch.Tensor, lambd: float = 0.0) -> torch.Tensor:
    """MMCR's loss -||C||_* + lambd * mean_i ||Z_i||_* (Yerxa et al. 2023).

    Every view embedding is L2-normalised; the centroid of image i is c_i = mean_j z_ij, C [N, D] stacks
    the centroids and Z_i [k, D] stacks image i's views.

    Args:
        z: projections [N, k, D] of k views of each of N images (the global batch); normalised here.
        lambd: weight of the per-image nuclear norms (0 in the paper's CIFAR and ImageNet runs; the term is
            then not computed).
    Returns:
        A scalar; ||C||_* is at most N for N <= D (views coincide, centroids orthonormal) and sqrt(N D)
        for N >= D (unit centroids spread evenly over all D directions).
    """
    if z.dim() != 3:
        raise ValueError(f"mmcr needs embeddings [N, views, D], got {tuple(z.shape)}")
    z = F.normalize(z.float(), dim=-1)
    loss = -nuclear_norm(z.mean(dim=1))
    if lambd != 0:
        loss = loss + lambd * nuclear_norm(z).mean()
    return loss
