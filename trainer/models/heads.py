"""Heads: the typed building blocks objectives put after the backbone (training-only, dropped at export, unless
an objective's ``ModelConfig`` says otherwise).

Naming: ``in_dim`` is the width a head reads (usually ``EmbeddingModel.embed_dim``), ``hidden_dim`` its inner
width and ``out_dim`` what it emits; an objective's options call the width of its projection ``projection_dim``
and that of its inner layers ``projection_hidden_dim`` / ``predictor_hidden_dim`` / ``head_hidden_dim``.
Each builder creates its parameters in a fixed order, so a seeded model is the same whichever objective builds it.

Vector heads ([N, in_dim] -> [N, out_dim]):
  * ``projection_mlp``: (Linear-BN-ReLU) x (layers - 1) then Linear (SimCLR, BYOL, SimSiam, MoCo v3, SwAV, ...);
  * ``mlp_head``: Linear-ReLU-Linear without normalisation (MoCo v2, CUT's netF);
  * ``linear_bn_relu``: one Linear-BN-ReLU layer (per-patch fc6 of context / jigsaw);
  * ``relu_mlp``: Linear-ReLU after every layer, non-negative outputs (counting's phi);
  * ``linear_layernorm_tanh``: Linear-LayerNorm-tanh (CURL);
  * ``gelu_mlp``: (Linear-BN-GELU) x (layers - 1) then Linear (MSN);
  * ``DINOHead`` with its ``WeightNormLinear`` last layer (DINO).
Map heads ([N, C, h, w] -> [N, out_dim, h, w], 1x1 convolutions):
  * ``conv_mlp``: conv-BN-ReLU-conv (PixPro's pixel projection);
  * ``conv_bn_relu``: conv-BN-ReLU (colorization);
  * ``conv_mlp_head``: conv-ReLU-conv without normalisation (DenseCL's dense head).
Predictors over grids:
  * ``RowPredictor`` (with ``MaskedContextBlock``): CPC's masked context network and its W_k.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """SimCLR-style MLP: (Linear-BN-ReLU) x (layers-1), then Linear (optionally BN without affine)."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += list(linear_bn_relu(dim, hidden_dim))  # flattened: parameter names stay 0.weight, 1.weight, ...
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear, with biases and no normalisation (MoCo v2's head, CUT's netF)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def linear_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    """One hidden layer of ``projection_mlp``: Linear (no bias) - BN - ReLU."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


def relu_mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear - ReLU between each pair of consecutive ``widths``, the last layer included (outputs >= 0)."""
    if len(widths) < 2:
        raise ValueError(f"relu_mlp needs at least an input and an output width, got {list(widths)}")
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers)


def linear_layernorm_tanh(in_dim: int, out_dim: int) -> nn.Sequential:
    """CURL's encoder output: Linear - LayerNorm - tanh."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.Tanh())


def gelu_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3) -> nn.Sequential:
    """(Linear-BN-GELU) x (layers - 1) then Linear: the ViT-era projection head (MSN's 3-layer head)."""
    if layers < 1:
        raise ValueError(f"gelu_mlp needs layers >= 1, got {layers}")
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*blocks)


def conv_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """A projection head on every cell of a map: 1x1 conv - BN - ReLU - 1x1 conv (PixPro)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, out_dim, 1))


def conv_mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """``mlp_head`` on every cell of a map: 1x1 conv - ReLU - 1x1 conv, no normalisation (DenseCL's dense head)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))


def conv_bn_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    """1x1 conv - BN - ReLU on every cell of a map."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight rows are g_k v_k / ||v_k|| (``torch.nn.utils.weight_norm``);
    with ``learn_norm=False`` the norms g stay 1, DINO's ``norm_last_layer``."""

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool = False):
        super().__init__()
        self.direction = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.norm = nn.Parameter(torch.ones(out_dim), requires_grad=learn_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.norm[:, None] * F.normalize(self.direction, dim=1))


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, GELU, optional BN) -> bottleneck -> L2 normalise -> weight-normalised
    last layer with ``out_dim`` outputs (DINO's ``DINOHead``, truncated-normal init with std 0.02)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"dino head needs layers >= 1, got {layers}")
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(dim, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            dim = hidden_dim
        blocks.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*blocks)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))


class MaskedContextBlock(nn.Module):
    """Residual block whose output at row i depends on rows <= i only (Hénaff et al., Algorithm 1):
    1x1 -> ReLU -> 1x3 (within the row) -> 2x1 over (row i - 1, row i) -> ReLU -> 1x1, added to the input."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden_dim, 1)
        self.row = nn.Conv2d(hidden_dim, hidden_dim, (1, 3), padding=(0, 1))
        self.column = nn.Conv2d(hidden_dim, hidden_dim, (2, 1))  # after padding one zero row on top
        self.expand = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.row(F.relu(self.reduce(x)))
        h = F.relu(self.column(F.pad(h, (0, 0, 1, 0))))
        return x + self.expand(h)


class RowPredictor(nn.Module):
    """Context network over the rows of a grid plus one linear W_k per step: z [N, H, W, D] ->
    {k: [N, H - k, W, target_dim]}, the prediction made at row i of the target at row i + k (CPC)."""

    def __init__(self, dim: int, hidden_dim: int, layers: int, target_dim: int, steps: list[int]):
        super().__init__()
        self.context = nn.Sequential(*[MaskedContextBlock(dim, hidden_dim) for _ in range(layers)], nn.ReLU())
        self.steps = list(steps)
        self.heads = nn.ModuleList([nn.Linear(dim, target_dim) for _ in self.steps])

    def forward(self, z: torch.Tensor) -> dict[int, torch.Tensor]:
        context = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [N, H, W, D]
        rows = z.shape[1]
        return {k: head(context[:, :rows - k]) for k, head in zip(self.steps, self.heads)}
