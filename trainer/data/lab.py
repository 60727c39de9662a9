"""CIE Lab for colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization"): vectorised sRGB <-> Lab,
the quantised ab gamut and the soft encoding of ab values over its bins.

Conventions: colours are channel-last tensors ``[..., 3]``; sRGB in [0, 1]; Lab under D65 / 2 degree observer
(L in [0, 100], white = (100, 0, 0)) with the exact CIE constants (epsilon = (6/29)^3, slope 1 / (3 (6/29)^2)),
so ``lab_to_rgb`` inverts ``rgb_to_lab``. (``trainer.models.colour`` has the forward conversion as in-graph
ONNX ops, channel-first, with the rounded constants of skimage; the two agree to ~1e-3.)

The gamut is computed, not tabulated: ``gamut_bins(grid)`` samples the sRGB cube densely, converts to Lab,
quantises a and b to the nearest multiple of ``grid`` and keeps every occupied (a, b) cell. With grid 10 this
gives 261 bins on a 64^3 sampling (262 from 96^3 on), where the paper has 313 over the same a range
(-90..100) and b range (-110..90) (its ``pts_in_hull.npy``: cells centred on multiples
of 10, which soft-encoding then addresses by nearest centre).
"""
from __future__ import annotations

import functools

import torch

_EPSILON = (6.0 / 29.0) ** 3
_SLOPE = 1.0 / (3.0 * (6.0 / 29.0) ** 2)  # 7.787...
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
# The white point is the XYZ of sRGB white under this matrix (0.95046, 1.0, 1.08885), so white maps to (100, 0, 0).
_WHITE = _XYZ_FROM_RGB.sum(dim=1)


def _check(colours: torch.Tensor) -> None:
    if colours.shape[-1] != 3:
        raise ValueError(f"colours must be channel-last [..., 3], got {tuple(colours.shape)}")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] sRGB in [0, 1] (clamped) -> [..., 3] L*a*b* (D65)."""
    _check(rgb)
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    t = linear @ _XYZ_FROM_RGB.to(rgb).t() / _WHITE.to(rgb)
    f = torch.where(t > _EPSILON, t.clamp_min(_EPSILON) ** (1.0 / 3.0), _SLOPE * t + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """[..., 3] L*a*b* -> [..., 3] sRGB; ``clamp=False`` keeps out-of-gamut values outside [0, 1] (gamut tests)."""
    _check(lab)
    lightness, a, b = lab.unbind(-1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-1)
    t = torch.where(f > 6.0 / 29.0, f ** 3, (f - 16.0 / 116.0) / _SLOPE)
    linear = (t * _WHITE.to(lab)) @ _RGB_FROM_XYZ.to(lab).t()
    magnitude = linear.abs()  # the transfer curve is odd-extended so out-of-gamut values stay finite
    curve = torch.where(magnitude > 0.0031308, 1.055 * magnitude.clamp_min(0.0031308) ** (1 / 2.4) - 0.055,
                        12.92 * magnitude)
    rgb = torch.sign(linear) * curve
    return rgb.clamp(0.0, 1.0) if clamp else rgb


@functools.lru_cache(maxsize=4)
def _gamut_bins(grid: float, samples_per_axis: int) -> torch.Tensor:
    axis = torch.linspace(0.0, 1.0, samples_per_axis, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    cells = torch.round(rgb_to_lab(cube)[:, 1:] / grid).to(torch.int64)
    occupied = torch.unique(cells, dim=0)  # sorted by a, then b
    return (occupied.to(torch.float64) * grid).to(torch.float32)


def gamut_bins(grid: float = 10.0, samples_per_axis: int = 64) -> torch.Tensor:
    """[Q, 2] centres (a, b) of the quantised ab cells (side ``grid``, centred on multiples of it) that some sRGB
    colour of a dense ``samples_per_axis``^3 sampling of the cube falls in. Q = 261 for grid 10 at the default
    64^3 sampling (262 from 96^3 on; the paper's table has 313)."""
    if grid <= 0 or samples_per_axis < 2:
        raise ValueError(f"gamut_bins: grid must be > 0 and samples_per_axis >= 2, got {grid}, {samples_per_axis}")
    return _gamut_bins(float(grid), int(samples_per_axis)).clone()


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's soft encoding of ground-truth ab: the ``neighbours`` nearest bin centres, weighted by a
    Gaussian of the distance (``sigma`` in ab units) and normalised to sum to 1.

    Args:
        ab: [..., 2] ab values. bins: [Q, 2] bin centres.
    Returns:
        (indices [..., neighbours] int64 into the bins, weights [..., neighbours] summing to 1), the sparse form
        that data workers ship; ``dense_targets`` scatters it to [..., Q].
    """
    if ab.shape[-1] != 2 or bins.dim() != 2 or bins.shape[-1] != 2:
        raise ValueError(f"soft_encode takes ab [..., 2] and bins [Q, 2], got {tuple(ab.shape)}, {tuple(bins.shape)}")
    if not 1 <= neighbours <= bins.shape[0] or sigma <= 0:
        raise ValueError(f"soft_encode: need 1 <= neighbours <= {bins.shape[0]} and sigma > 0")
    squared = ((ab.unsqueeze(-2) - bins.to(ab)) ** 2).sum(-1)            # [..., Q]
    nearest, indices = squared.topk(neighbours, dim=-1, largest=False)
    weights = torch.softmax(-nearest / (2.0 * sigma ** 2), dim=-1)        # exp(-d^2 / 2 sigma^2), normalised
    return indices, weights


def dense_targets(indices: torch.Tensor, weights: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Sparse soft encoding (indices, weights [..., K]) -> dense distributions [..., num_bins]."""
    out = torch.zeros(*indices.shape[:-1], num_bins, dtype=weights.dtype, device=weights.device)
    return out.scatter_add_(-1, indices, weights)
