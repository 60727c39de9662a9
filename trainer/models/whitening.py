"""Whitening layers.

``IterNorm``: iterative normalisation (Huang, Zhou, Zhu, Liu & Shao 2019, "Iterative Normalization: Beyond
Standardization towards Efficient Whitening"), VIbCReg's last projector layer. The D features are split into
``num_groups`` groups of D / G; within each group, over the batch:

    x_c = x - mean,  Sigma = eps I + x_c x_c^T / N,  Sigma_N = Sigma / tr(Sigma)
    P_0 = I,  P_{k+1} = (3 P_k - P_k^3 Sigma_N) / 2   (k < T: Newton-Schulz iterations towards Sigma_N^{-1/2})
    output = P_T / sqrt(tr(Sigma)) x_c                  (approximately Sigma^{-1/2} x_c: whitened)

then a per-feature affine (weight 1, bias 0 at the start), like batch norm. Keep T small (the paper's 5): the
iteration converges for every eigenvalue of Sigma_N in (0, 1], but once converged it amplifies float32 rounding
(20 iterations on a 3 x 3 group already lose the whitening). Gradients flow through the
iterations by autograd (the reference code writes the same backward by hand). Training mode also keeps running
averages of the mean and the whitening matrix (momentum 0.1), used in eval mode. Statistics are over the rows it
is given: a caller that wants the global batch's whitening passes the gathered batch.
"""
from __future__ import annotations

import torch
from torch import nn


class IterNorm(nn.Module):
    """[N, D] -> [N, D] group-whitened features (Huang et al. 2019), T Newton iterations per group."""

    def __init__(self, num_features: int, num_groups: int = 64, iterations: int = 5, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True):
        super().__init__()
        if num_features < 1 or num_groups < 1 or num_features % num_groups:
            raise ValueError(f"IterNorm: num_groups ({num_groups}) must divide num_features ({num_features})")
        if iterations < 1:
            raise ValueError(f"IterNorm: iterations must be >= 1, got {iterations}")
        if eps < 0 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"IterNorm: need eps >= 0 and momentum in [0, 1], got {eps} and {momentum}")
        self.num_features, self.num_groups, self.iterations = num_features, num_groups, iterations
        self.group_size = num_features // num_groups
        self.eps, self.momentum = eps, momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_groups, self.group_size, 1))
        self.register_buffer("running_whitening", torch.eye(self.group_size).repeat(num_groups, 1, 1))

    def whitening_matrix(self, centred: torch.Tensor) -> torch.Tensor:
        """[G, d, N] centred groups -> [G, d, d] approximate Sigma^{-1/2} of each group."""
        rows = centred.shape[-1]
        identity = torch.eye(self.group_size, dtype=centred.dtype, device=centred.device)
        identity = identity.expand(self.num_groups, -1, -1)
        sigma = self.eps * identity + centred @ centred.transpose(1, 2) / rows
        trace_inverse = 1.0 / sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]  # [G, 1, 1]
        sigma_n = sigma * trace_inverse
        p = identity
        for _ in range(self.iterations):
            p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
        return p * trace_inverse.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"IterNorm expects [N, {self.num_features}], got {tuple(x.shape)}")
        # float32 even under autocast: the Newton iterations compound the rounding of every matrix product.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self._whiten(x.float())
        return out.to(x.dtype)

    def _whiten(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.t().reshape(self.num_groups, self.group_size, -1)  # [G, d, N]
        if self.training:
            if x.shape[0] < 2:
                raise ValueError(f"IterNorm needs >= 2 rows in training mode, got {x.shape[0]}")
            mean = groups.mean(-1, keepdim=True)
            centred = groups - mean
            whitening = self.whitening_matrix(centred)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_whitening.lerp_(whitening.detach(), self.momentum)
        else:
            centred, whitening = groups - self.running_mean, self.running_whitening
        out = (whitening @ centred).reshape(self.num_features, -1).t()
        if self.weight is not None:
            out = out * self.weight.float() + self.bias.float()
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_groups={self.num_groups}, iterations={self.iterations}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.weight is not None}")
