"""Sketched Gaussian regularisers: LeJEPA's SIGReg and VISReg's centre / scale / shape terms.

LeJEPA (Balestriero & LeCun 2025, "LeJEPA: Provable and Scalable Self-Supervised Learning Without the
Heuristics", arXiv 2511.08544): every view's embedding predicts the mean of the global views' embeddings (MSE),
and SIGReg drives the embeddings towards an isotropic Gaussian by projecting them onto M random unit directions
and testing each 1-D projection against N(0, 1) with the Epps-Pulley statistic
    T = N * integral over [-t_max, t_max] of |phi_N(t) - exp(-t^2 / 2)|^2 exp(-t^2 / 2) dt,
phi_N the empirical characteristic function (ECF). The integrand is even in t, so the trapezoid rule runs over the
knots of [0, t_max] with doubled interior weights (the reference code's 17 knots on [0, 3]).

VISReg (Wu et al. 2026, arXiv 2606.02572) decouples the regulariser into a centre term (batch mean -> 0), a scale
term (per-dimension std -> 1) and a shape term: the sliced 2-Wasserstein distance between the standardised
(stop-gradient std) projections and the quantiles of N(0, 1), on random directions as SIGReg draws them.

Shapes: embeddings ``z`` are [..., N, D] (leading dims are views; each view's N rows are one sample set),
directions [D, M] with unit columns. Random directions are always passed in (``random_directions`` draws them
from a caller's generator), never taken from the global RNG. Where the batch is split over processes, the
caller passes ``reduce_sum`` (an autograd-aware sum over processes) and ``total_samples`` (the global N), or
gathers the rows itself.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def random_directions(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random unit directions in R^dim as the columns of a [dim, count] float32 tensor, drawn from
    ``generator`` (on its device): isotropic because a standard Gaussian vector normalised is uniform on the
    sphere. Seeding the generator with the training step gives every process the same directions."""
    if dim < 1 or count < 1:
        raise ValueError(f"random_directions needs dim >= 1 and count >= 1, got {dim} and {count}")
    directions = torch.randn(dim, count, generator=generator, device=generator.device)
    return directions / directions.norm(dim=0, keepdim=True)


def epps_pulley_knots(knots: int = 17, t_max: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies t [K] = linspace(0, t_max, K) and quadrature weights [K] for ``epps_pulley``.

    The weights are the trapezoid rule's over [-t_max, t_max] folded onto t >= 0 (dt at both ends, 2 dt
    inside, since the integrand is even), times the Gaussian window exp(-t^2 / 2)."""
    if knots < 2:
        raise ValueError(f"knots must be >= 2, got {knots}")
    if t_max <= 0:
        raise ValueError(f"t_max must be > 0, got {t_max}")
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float64)
    step = t_max / (knots - 1)
    weights = torch.full((knots,), 2.0 * step, dtype=torch.float64)
    weights[0] = weights[-1] = step
    return t.float(), (weights * torch.exp(-0.5 * t * t)).float()


def epps_pulley(projections: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                reduce_sum: ReduceSum | None = None, total_samples: int | None = None) -> torch.Tensor:
    """Epps-Pulley statistic of each 1-D sample set against N(0, 1), by quadrature over ``t``.

    Args:
        projections: [..., N, M]: M sample sets of N values each (a column per direction).
        t, weights: [K] knots and weights from ``epps_pulley_knots``.
        reduce_sum: sums the ECF's [..., M, K] cos / sin sums over processes (autograd-aware) when the N rows
            are this process's share of the batch; None on one process.
        total_samples: the global N (defaults to the local N).
    Returns:
        [..., M]: N * sum_k w_k ((mean cos(t_k x) - exp(-t_k^2 / 2))^2 + (mean sin(t_k x))^2), >= 0.
    """
    t = t.to(projections.dtype)
    weights = weights.to(projections.dtype)
    angles = projections.unsqueeze(-1) * t  # [..., N, M, K]
    sums = torch.stack([angles.cos().sum(-3), angles.sin().sum(-3)])  # [2, ..., M, K]
    if reduce_sum is not None:
        sums = reduce_sum(sums)  # one collective for both parts of the ECF
    samples = total_samples if total_samples is not None else projections.shape[-2]
    real, imaginary = sums[0] / samples, sums[1] / samples
    error = (real - torch.exp(-0.5 * t * t)).square() + imaginary.square()  # |ECF - phi|^2 at each knot
    return samples * (error @ weights)


def sigreg(z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
           reduce_sum: ReduceSum | None = None, total_samples: int | None = None) -> torch.Tensor:
    """SIGReg: the Epps-Pulley statistic of ``z`` [..., N, D] projected on ``directions`` [D, M], averaged over
    the directions and the leading (view) dims. About 1 for a standard-normal sample (the statistic's mean under
    the null is sqrt(2 pi) - sqrt(2 pi / 3) = 1.06 on the whole line) and about 0.41 N for all rows at 0."""
    if z.shape[-1] != directions.shape[0]:
        raise ValueError(f"sigreg: embeddings of width {z.shape[-1]} and directions of width {directions.shape[0]}")
    return epps_pulley(z @ directions.to(z.dtype), t, weights, reduce_sum, total_samples).mean()


def lejepa_prediction(z: torch.Tensor, num_global: int, reduce_sum: ReduceSum | None = None,
                      total_samples: int | None = None) -> torch.Tensor:
    """LeJEPA's prediction loss: mean over views, samples and dims of (mean of the global views - view)^2.

    Args:
        z: [V, N, D] embeddings, the first ``num_global`` views global; no stop-gradient on the centres.
        reduce_sum, total_samples: as ``epps_pulley``; the loss is the global batch's mean.
    """
    if z.dim() != 3 or not 1 <= num_global <= z.shape[0]:
        raise ValueError(f"lejepa_prediction needs [V, N, D] embeddings with 1 <= num_global <= V, got "
                         f"{tuple(z.shape)} and {num_global}")
    centres = z[:num_global].mean(0)
    total = (z - centres).square().sum()
    if reduce_sum is None:
        return total / z.numel()
    samples = total_samples if total_samples is not None else z.shape[1]
    return reduce_sum(total) / (z.shape[0] * samples * z.shape[2])


class LeJEPATerms(NamedTuple):
    total: torch.Tensor       # (1 - lambd) * prediction + lambd * sigreg
    prediction: torch.Tensor
    sigreg: torch.Tensor


def lejepa(z: torch.Tensor, num_global: int, directions: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
           lambd: float = 0.05, reduce_sum: ReduceSum | None = None, total_samples: int | None = None) -> LeJEPATerms:
    """LeJEPA's loss on [V, N, D] embeddings (globals first): (1 - lambd) * prediction + lambd * SIGReg, SIGReg
    taken per view (each view's batch one sample set) and averaged over views and directions."""
    prediction = lejepa_prediction(z, num_global, reduce_sum, total_samples)
    regulariser = sigreg(z, directions, t, weights, reduce_sum, total_samples)
    return LeJEPATerms((1.0 - lambd) * prediction + lambd * regulariser, prediction, regulariser)


def visreg_center(z: torch.Tensor) -> torch.Tensor:
    """VISReg's centre term: the squared batch mean of ``z`` [..., N, D], averaged over dims (and views)."""
    return z.mean(dim=-2).square().mean()


def visreg_scale(z: torch.Tensor) -> torch.Tensor:
    """VISReg's scale term: (1 - std)^2 of every dimension of ``z`` [..., N, D] over the N rows (population
    std), averaged over dims (and views). Its gradient stays finite as the embeddings collapse."""
    return (1.0 - z.std(dim=-2, unbiased=False)).square().mean()


def gaussian_quantiles(count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The N(0, 1) quantiles at i / (count + 1), i = 1..count, ascending [count] (never infinite)."""
    positions = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)
    return torch.special.ndtri(positions).to(dtype)


def visreg_shape(z: torch.Tensor, directions: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VISReg's shape term: sliced 2-Wasserstein distance to N(0, 1) of the standardised embeddings.

    Each dimension of ``z`` [..., N, D] is centred and divided by (its population std, detached, + eps), so
    the shape gradient leaves the scale to ``visreg_scale``; the projections on ``directions`` [D, M] are
    sorted over the N rows and compared with ``gaussian_quantiles(N)``; mean squared difference over rows,
    directions and views."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    standardised = (z - z.mean(dim=-2, keepdim=True)) / (z.std(dim=-2, unbiased=False, keepdim=True).detach() + eps)
    projections = (standardised @ directions.to(z.dtype)).sort(dim=-2).values  # [..., N, M]
    quantiles = gaussian_quantiles(z.shape[-2], z.dtype).to(z.device)
    return (projections - quantiles[:, None]).square().mean()


class VISRegTerms(NamedTuple):
    total: torch.Tensor       # (1 - lambd) * prediction + lambd * (weighted centre + scale + shape)
    prediction: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    shape: torch.Tensor


def visreg(z: torch.Tensor, num_global: int, directions: torch.Tensor, lambd: float = 0.9, center_weight: float = 1.0,
           scale_weight: float = 1.0, shape_weight: float = 1.0, eps: float = 1e-4) -> VISRegTerms:
    """VISReg's loss on [V, N, D] embeddings of the whole batch (globals first): LeJEPA's prediction term and the
    weighted centre / scale / shape regulariser, each view's batch one sample set."""
    prediction = lejepa_prediction(z, num_global)
    center, scale, shape = visreg_center(z), visreg_scale(z), visreg_shape(z, directions, eps)
    regulariser = center_weight * center + scale_weight * scale + shape_weight * shape
    return VISRegTerms((1.0 - lambd) * prediction + lambd * regulariser, prediction, center, scale, shape)
