"""Losses that spread embeddings by a spectral measure of their covariance: FroSSL's log-Frobenius entropy
(Skean et al. 2024) and EMP-SSL's total coding rate (Tong et al. 2023), each with its invariance term.

* ``frossl(z)``: Skean et al. 2024, "FroSSL: Frobenius Norm Minimization for Self-Supervised Learning".
  Per view, the log of the squared Frobenius norm of the trace-normalised covariance (minimised: its
  negative is the order-2 Renyi entropy of the eigenvalues, maximal when they are equal) plus the MSE of
  every view to the mean view.
* ``total_coding_rate(z, eps_squared)`` and ``emp_ssl(z)``: Tong et al. 2023, "EMP-SSL: Towards
  Self-Supervised Learning in One Training Epoch". R(Z) = 1/2 logdet(I + D / (N eps^2) Z^T Z) of each
  patch's embeddings over the batch (maximised) plus the cosine similarity of every patch embedding to the
  mean embedding of its image's patches (maximised).

Pure functions of tensors; the callers gather the global batch (both terms are batch statistics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def frobenius_entropy(z: torch.Tensor) -> torch.Tensor:
    """FroSSL's regulariser for each view: log ||C||_F^2 with C = Z^T Z / tr(Z^T Z) (Skean et al. 2024).

    Z is one view's embeddings [N, D] with each dimension L2-normalised over the batch (a unit column per
    dimension, so tr(Z^T Z) = D). ||C||_F^2 = sum of the squared eigenvalues of C, which sum to 1: it is
    1/D when the eigenvalues are equal (spread) and 1 when one direction holds everything (collapse), so
    minimising its log maximises the order-2 entropy. Z Z^T [N, N] has the same non-zero eigenvalues, and
    the smaller of the two is formed.

    Args:
        z: [N, V, D] embeddings of V views (the global batch), not yet normalised.
    Returns:
        [V] the log squared Frobenius norm of each view's trace-normalised covariance, in [-log min(N, D), 0].
    """
    if z.dim() != 3 or z.shape[0] < 2:
        raise ValueError(f"frossl needs embeddings [N >= 2, views, D], got {tuple(z.shape)}")
    columns = F.normalize(z.float().transpose(0, 1), dim=1)  # [V, N, D], unit norm per dimension over N
    n, d = columns.shape[1], columns.shape[2]
    gram = columns.transpose(1, 2) @ columns if n > d else columns @ columns.transpose(1, 2)
    trace = torch.diagonal(gram, dim1=1, dim2=2).sum(-1)
    return torch.log(gram.pow(2).sum(dim=(1, 2)) / trace.pow(2))


def view_invariance(z: torch.Tensor) -> torch.Tensor:
    """FroSSL's invariance term: sum over views of ||Z_v - Z_mean||_F^2 / N, Z_v each view's embeddings
    [N, D] L2-normalised per dimension over the batch and Z_mean their mean over views (Skean et al. 2024; the
    authors' solo-learn code writes it V * D * MSE over all V N D entries, lightly's FroSSLLoss V times that).

    Args:
        z: [N, V, D] embeddings of V views (the global batch), not yet normalised.
    Returns:
        A scalar >= 0, 0 when every view gives the same normalised embeddings.
    """
    if z.dim() != 3 or z.shape[0] < 2:
        raise ValueError(f"frossl needs embeddings [N >= 2, views, D], got {tuple(z.shape)}")
    normalised = F.normalize(z.float(), dim=0)  # per view and dimension, over the N images
    return (normalised - normalised.mean(dim=1, keepdim=True)).pow(2).sum() / z.shape[0]


def frossl(z: torch.Tensor, invariance_weight: float = 1.0) -> torch.Tensor:
    """FroSSL's loss: sum over views of log ||C_v||_F^2 (``frobenius_entropy``) + invariance_weight times
    ``view_invariance`` (Skean et al. 2024).

    Args:
        z: [N, V, D] projections of V >= 2 views of N images (the global batch).
        invariance_weight: lambda, the weight of the invariance term (1 in the paper).
    Returns:
        A scalar, >= -V log min(N, D).
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"frossl needs embeddings [N, views >= 2, D], got {tuple(z.shape)}")
    return frobenius_entropy(z).sum() + invariance_weight * view_invariance(z)


def total_coding_rate(z: torch.Tensor, eps_squared: float = 0.2) -> torch.Tensor:
    """The total coding rate R(Z) = 1/2 logdet(I_D + D / (N eps^2) Z^T Z) (Tong et al. 2023; Ma et al.
    2007): the rate (nats per row) at which the N rows of Z [N, D] can be coded up to distortion eps, large when
    they span many directions. Computed as 1/2 logdet(I_N + D / (N eps^2) Z Z^T) when N < D (the same determinant).

    Args:
        z: [..., N, D] embeddings (each set in the leading dimensions on its own), usually L2-normalised.
        eps_squared: eps^2 (0.2 in the paper; the ``eps`` of the authors' code).
    Returns:
        [...] the coding rate of each set, >= 0 (0 for Z = 0).
    """
    if z.dim() < 2:
        raise ValueError(f"total_coding_rate needs [..., N, D] embeddings, got {tuple(z.shape)}")
    if eps_squared <= 0:
        raise ValueError(f"eps_squared must be > 0, got {eps_squared}")
    z = z.float()
    n, d = z.shape[-2], z.shape[-1]
    gram = z.transpose(-2, -1) @ z if n >= d else z @ z.transpose(-2, -1)
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return 0.5 * torch.logdet(identity + (d / (n * eps_squared)) * gram)


def patch_invariance(z: torch.Tensor) -> torch.Tensor:
    """EMP-SSL's invariance: the cosine similarity of each patch embedding to the mean embedding of its image's
    patches, averaged over patches and images (Tong et al. 2023). z: [N, P, D] -> scalar in [-1, 1]."""
    if z.dim() != 3:
        raise ValueError(f"patch_invariance needs embeddings [N, patches, D], got {tuple(z.shape)}")
    z = z.float()
    return F.cosine_similarity(z, z.mean(dim=1, keepdim=True), dim=-1).mean()


def emp_ssl(z: torch.Tensor, eps_squared: float = 0.2, invariance_weight: float = 200.0) -> torch.Tensor:
    """EMP-SSL's loss (Tong et al. 2023): -(mean over patches p of R(Z_p) + lambda * ``patch_invariance``).

    Z_p [N, D] holds patch p of every image; the authors' code averages the coding rate over the P patch
    indices, and the network's embeddings are L2-normalised before the loss.

    Args:
        z: [N, P, D] L2-normalised patch embeddings of P patches of each of N images (the global batch).
        eps_squared: eps^2 of the coding rate (0.2).
        invariance_weight: lambda (200 in the paper).
    Returns:
        A scalar (minimised).
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"emp_ssl needs embeddings [N, patches >= 2, D], got {tuple(z.shape)}")
    rate = total_coding_rate(z.transpose(0, 1), eps_squared).mean()
    return -(rate + invariance_weight * patch_invariance(z))
