"""Projection heads (removed at export)."""
from __future__ import annotations

from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """SimCLR-style MLP: (Linear-BN-ReLU) x (layers-1), then Linear (optionally BN without affine)."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)
