"""Differentiable colour-space conversions as plain torch ops (1x1 convolutions, pow, where), so they run
inside the exported ONNX image encoder.

CMC (Tian et al. 2019) contrasts channel groups of a colour space (L vs ab of CIE Lab, or Y, Cb, Cr). The
exported model takes the usual normalised RGB pixels and converts in-graph: ``ColourSpace`` un-normalises with
the model's mean/std, clamps to the valid [0, 1] range (the sRGB transfer curve and the Lab cube root are only
defined there; clamping also keeps random parity-check inputs finite), converts, and rescales every channel to
about [-1, 1] with a fixed per-space centre and half-range (CMC's reference code normalises Lab the same way).

Conventions: ``rgb`` is sRGB in [0, 1]; ``lab`` is CIE L*a*b* under D65 / 2 degree observer (L in [0, 100]),
the definition of skimage's ``rgb2lab``; ``ycbcr`` is full-range ITU-R BT.601 (JPEG) with Y in [0, 1] and
Cb, Cr in [-0.5, 0.5] (centred at 0 rather than JPEG's 0.5 offset).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Constants as tensors made once (moved with ``.to``, which traces cleanly into ONNX constants).
# sRGB (linear) -> XYZ, D65 (skimage's xyz_from_rgb).
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]])
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
_YCBCR_FROM_RGB = torch.tensor([[0.299, 0.587, 0.114],
                                [-0.168736, -0.331264, 0.5],
                                [0.5, -0.418688, -0.081312]])


def _apply_matrix(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, H, W], each pixel multiplied by the 3x3 ``matrix`` (a 1x1 convolution)."""
    return F.conv2d(images, matrix.to(images).view(3, 3, 1, 1))


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """Inverse sRGB transfer curve (IEC 61966-2-1) of values in [0, 1]."""
    rgb = rgb.clamp(0.0, 1.0)
    return torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def rgb_to_xyz(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] sRGB in [0, 1] -> CIE XYZ (D65, Y of white = 1)."""
    return _apply_matrix(srgb_to_linear(rgb), _XYZ_FROM_RGB)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] sRGB in [0, 1] -> CIE L*a*b* [N, 3, H, W] (D65; L in [0, 100], a, b about [-128, 127]).

    White is (100, 0, 0); pure red is (53.24, 80.09, 67.20).
    """
    xyz = rgb_to_xyz(rgb)
    t = xyz / _D65_WHITE.to(xyz)
    # CIE f(t): cube root above (6/29)^3, the linear toe below; clamp keeps pow's base positive.
    f = torch.where(t > 0.008856, t.clamp_min(1e-6) ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    return torch.cat([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> full-range BT.601 Y in [0, 1], Cb and Cr in [-0.5, 0.5]."""
    return _apply_matrix(rgb.clamp(0.0, 1.0), _YCBCR_FROM_RGB)


def rgb_identity(rgb: torch.Tensor) -> torch.Tensor:
    return rgb.clamp(0.0, 1.0)


# name -> (conversion from RGB in [0, 1], per-channel centre, per-channel half-range): (x - centre) / half
# maps each channel to about [-1, 1]. Lab's a/b ranges are those of the sRGB gamut, as in CMC's code.
COLOUR_SPACES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[float, ...], tuple[float, ...]]] = {
    "rgb": (rgb_identity, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "lab": (rgb_to_lab, (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2),
            (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2)),
    "ycbcr": (rgb_to_ycbcr, (0.5, 0.0, 0.0), (0.5, 0.5, 0.5)),
}


class ColourSpace(nn.Module):
    """Normalised RGB [N, 3, H, W] (``(x - mean) / std``) -> the named colour space, each channel scaled to
    about [-1, 1]. Constants are non-persistent buffers: they follow ``.to(device)`` but are not weights."""

    def __init__(self, space: str, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if space not in COLOUR_SPACES:
            raise ValueError(f"unknown colour space {space!r}; known: {', '.join(sorted(COLOUR_SPACES))}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"colour space {space!r} converts 3-channel RGB; got mean {list(mean)}, std {list(std)}")
        self.space = space
        convert, centre, half = COLOUR_SPACES[space]
        self._convert = convert
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("half_range", torch.tensor(half, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # In float32 even under mixed precision: the cube root and the Lab scale factors lose too much in fp16.
        with torch.autocast(device_type=images.device.type, enabled=False):
            rgb = images.float() * self.std + self.mean
            return (self._convert(rgb) - self.centre) / self.half_range

    def extra_repr(self) -> str:
        return f"space={self.space!r}"
