"""Patch-level Kernel Alignment (Yeo, Jang & Kim 2025, "Patch-Level Kernel Alignment for Dense Self-Supervised
Learning", arXiv 2509.05606).

For each image, the student's and the teacher's tokens (the same N locations) give linear kernels
K_s = Z_s Z_s^T and K_t = Z_t Z_t^T [N, N]; with the centring matrix H = I - 11^T / N,

    CKA = <H K_s H, H K_t H>_F / (||H K_s H||_F ||H K_t H||_F),    L = 1 - CKA,

averaged over the images. CKA is invariant to isotropic scaling and orthogonal transforms of either side's
features, so the student matches the teacher's relational structure between patches, not the features.
"""
from __future__ import annotations

import torch

# Floor of each HSIC term before the square root: an image whose kernel is (near) constant keeps a finite
# gradient (its CKA is ~0, the loss ~1) instead of 0/0.
_EPS = 1e-6


def _centred_kernel(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """H K H over the valid tokens of each image (rows and columns of ignored tokens are 0).

    Centring the kernel equals the kernel of the centred features, (H Z)(H Z)^T, which is cheaper and exact."""
    weights = valid.to(features.dtype)[..., None]                                   # [B, N, 1]
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    centred = (features - (features * weights).sum(dim=1, keepdim=True) / count) * weights
    return centred @ centred.transpose(1, 2)


def patch_kernel_alignment(student: torch.Tensor, teacher: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images of 1 - CKA(K_student, K_teacher) with linear kernels (the module docstring).

    Args:
        student: [B, N, D] student tokens (with gradient).
        teacher: [B, N, D'] teacher tokens of the same N locations (detached here); D' may differ from D.
        mask: optional [B, N] bool, True for tokens to ignore; images with fewer than two valid tokens are left
            out of the mean (0 with a graph when none is left).
    Returns: a scalar in [0, 1] (computed in float32).
    """
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"expected [B, N, D] student and teacher tokens with equal B and N, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if mask is not None and (mask.shape != student.shape[:2] or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool [B, N] = {tuple(student.shape[:2])} tensor, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    valid = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device) if mask is None else ~mask
    # float32: HSIC terms of small centred kernels underflow in half precision (sqrt(0) -> inf gradients).
    k_s = _centred_kernel(student.float(), valid)
    k_t = _centred_kernel(teacher.detach().float(), valid)
    hsic_st = (k_s * k_t).sum(dim=(1, 2))
    norms = (k_s * k_s).sum(dim=(1, 2)).clamp_min(_EPS).sqrt() * (k_t * k_t).sum(dim=(1, 2)).clamp_min(_EPS).sqrt()
    loss = 1.0 - hsic_st / norms
    used = valid.sum(dim=1) >= 2
    if not used.any():
        return student.sum() * 0.0
    return loss[used].mean()
