"""Variance-invariance-covariance losses: VICReg (Bardes, Ponce & LeCun 2022, "VICReg: Variance-Invariance-
Covariance Regularization for Self-Supervised Learning"), its local version VICRegL (Bardes, Ponce & LeCun 2022,
"VICRegL: Self-Supervised Learning of Local Visual Features") and VIbCReg (Lee & Aune 2021, "Computer Vision
Self-supervised Learning Methods on Time Series", Variance-Invariance-better-Covariance Regularization).

Pure functions of tensors. The variance and covariance terms are statistics over the batch: pass the GLOBAL
batch (the objective gathers it across processes with gradient), as the authors' ``FullGatherLayer`` does.

* ``variance_hinge(z)``: mean over dimensions of max(0, 1 - sqrt(Var(z_d) + eps)), Var unbiased over dim 0.
* ``covariance_penalty(z)``: sum of squared off-diagonal covariances / D (covariance over dim 0, / (N - 1)).
* ``normalised_covariance_penalty(z)``: VIbCReg's term: the columns centred and L2-normalised along the batch
  (so C is the correlation matrix), sum of squared off-diagonal entries / D^2 (the authors' ``.mean()`` over
  the D x D matrix with its diagonal zeroed).
* ``vicreg(z1, z2)``: 25 MSE + 25 (v(z1) + v(z2)) / 2 + 1 (c(z1) + c(z2)), as the authors' ``main_vicreg.py``
  (the paper's eq. 6 writes mu [v(Z) + v(Z')]; the code halves it, and the 25 / 25 / 1 weights go with the code).
* ``vibcreg(z1, z2)``: 25 MSE + 25 (v(z1) + v(z2)) + 200 (c~(z1) + c~(z2)), as the authors' code.
* ``vicregl_global(embeddings)`` and ``vicregl_local(...)``: the two halves of VICRegL's loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

VARIANCE_EPS = 1e-4  # inside the square root of the variance term (all three papers)


class VICRegTerms(NamedTuple):
    """The weighted total and its three UNweighted terms (for logging)."""

    loss: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """[..., D, D] -> [..., D * (D - 1)]: every entry but the diagonal."""
    size = matrix.shape[-1]
    mask = ~torch.eye(size, dtype=torch.bool, device=matrix.device)
    return matrix[..., mask]


def _check_batch(z: torch.Tensor, name: str) -> None:
    if z.dim() < 2 or z.shape[0] < 2:
        raise ValueError(f"{name} needs [N >= 2, ..., D] embeddings, got {tuple(z.shape)}")


def variance_hinge(z: torch.Tensor, eps: float = VARIANCE_EPS, target: float = 1.0) -> torch.Tensor:
    """VICReg's v(Z) (eq. 1): mean of max(0, target - sqrt(Var(z_j) + eps)) over every column j.

    Args:
        z: [N, ..., D]; the variance is taken over dim 0 (the batch), unbiased, for every other index.
        eps: added to the variance before the square root (1e-4); target: gamma, the std aimed at (1).
    Returns:
        A scalar, 0 when every column's std reaches ``target``.
    """
    _check_batch(z, "variance_hinge")
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return F.relu(target - std).mean()


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """VICReg's c(Z) (eq. 3): (1 / D) sum_{i != j} Cov(Z)_ij^2 with Cov over dim 0, divided by N - 1.

    Args:
        z: [N, D], or [N, K, D] for K independent sets (VICRegL's matched positions): one covariance per k,
            the result averaged over k.
    """
    _check_batch(z, "covariance_penalty")
    z = z.float()
    n, dim = z.shape[0], z.shape[-1]
    centred = z - z.mean(dim=0, keepdim=True)
    covariance = torch.einsum("n...c,n...d->...cd", centred, centred) / (n - 1)
    return (_off_diagonal(covariance).pow(2).sum(-1) / dim).mean()


def normalised_covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """VIbCReg's decorrelation term: columns of z [N, D] centred and L2-normalised along the batch, so
    C = Z_n^T Z_n is the correlation matrix; (1 / D^2) sum_{i != j} C_ij^2. Scale-free per column, in [0, 1)."""
    _check_batch(z, "normalised_covariance_penalty")
    z = z.float()
    centred = z - z.mean(dim=0, keepdim=True)
    unit = F.normalize(centred, p=2, dim=0)
    correlation = unit.t() @ unit
    return _off_diagonal(correlation).pow(2).sum() / correlation.shape[0] ** 2


def invariance(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """s(Z, Z'): the mean squared error over every entry (the authors' ``F.mse_loss``)."""
    if z1.shape != z2.shape:
        raise ValueError(f"invariance needs two tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    return F.mse_loss(z1.float(), z2.float())


def vicreg(z1: torch.Tensor, z2: torch.Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
           covariance_weight: float = 1.0, eps: float = VARIANCE_EPS) -> VICRegTerms:
    """VICReg's loss on the expander outputs of two views.

    Args:
        z1, z2: [N, D] expansions of view 1 and view 2, rows aligned (row b of each is image b); the global
            batch, N >= 2.
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu (25, 25, 1).
        eps: inside the variance term's square root.
    Returns:
        ``VICRegTerms``: loss = lambda s + mu v + nu c with s = MSE(z1, z2), v = (v(z1) + v(z2)) / 2 and
        c = c(z1) + c(z2).
    """
    s = invariance(z1, z2)
    v = (variance_hinge(z1, eps) + variance_hinge(z2, eps)) / 2
    c = covariance_penalty(z1) + covariance_penalty(z2)
    return VICRegTerms(invariance_weight * s + variance_weight * v + covariance_weight * c, s, v, c)


def vibcreg(z1: torch.Tensor, z2: torch.Tensor, invariance_weight: float = 25.0, variance_weight: float = 25.0,
            covariance_weight: float = 200.0, eps: float = VARIANCE_EPS) -> VICRegTerms:
    """VIbCReg's loss on the (IterNorm-whitened) projections of two views.

    Args:
        z1, z2: [N, D] projections of the two views, rows aligned; the global batch, N >= 2.
        invariance_weight, variance_weight, covariance_weight: lambda, mu, nu (25, 25, 200 in the paper).
    Returns:
        ``VICRegTerms``: loss = lambda MSE + mu (v(z1) + v(z2)) + nu (c~(z1) + c~(z2)), c~ the normalised
        covariance penalty (the authors' code sums both views' variance terms, unlike VICReg's code).
    """
    s = invariance(z1, z2)
    v = variance_hinge(z1, eps) + variance_hinge(z2, eps)
    c = normalised_covariance_penalty(z1) + normalised_covariance_penalty(z2)
    return VICRegTerms(invariance_weight * s + variance_weight * v + covariance_weight * c, s, v, c)


def vicregl_global(embeddings: Sequence[torch.Tensor], invariance_weight: float = 25.0, variance_weight: float = 25.0,
                   covariance_weight: float = 1.0, eps: float = VARIANCE_EPS) -> VICRegTerms:
    """VICRegL's global term over multi-crop embeddings (the authors' ``global_loss``).

    Invariance: MSE between each of the 2 global crops (the first two entries) and every other crop, averaged
    over those pairs; variance and covariance: v(z) and c(z) of every crop, averaged over crops.

    Args:
        embeddings: V >= 2 tensors [N, D] (global crops first), the global batch, rows aligned.
    """
    if len(embeddings) < 2:
        raise ValueError(f"vicregl_global needs at least the 2 global crops, got {len(embeddings)}")
    pairs = [(i, j) for i in range(2) for j in range(len(embeddings)) if j != i]
    s = torch.stack([invariance(embeddings[i], embeddings[j]) for i, j in pairs]).mean()
    v = torch.stack([variance_hinge(z, eps) for z in embeddings]).mean()
    c = torch.stack([covariance_penalty(z) for z in embeddings]).mean()
    return VICRegTerms(invariance_weight * s + variance_weight * v + covariance_weight * c, s, v, c)


def nearest_matches(inputs: torch.Tensor, candidates: torch.Tensor, distances: torch.Tensor,
                    num_matches: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """VICRegL's matching: each input cell's nearest candidate cell; keep the ``num_matches`` input cells whose
    nearest candidate is closest, in their original cell order (as the authors' ``neirest_neighbores``).

    Args:
        inputs: [N, La, C] features of view a's cells; candidates: [N, Lb, C] of view b's.
        distances: [N, La, Lb] the distance that defines "nearest" (feature L2 or image location).
        num_matches: cells kept per image; None (or more than La) keeps every input cell.
    Returns:
        (kept inputs [N, k, C], their nearest candidates [N, k, C]).
    """
    if distances.shape != (*inputs.shape[:2], candidates.shape[1]):
        raise ValueError(f"distances {tuple(distances.shape)} do not pair inputs {tuple(inputs.shape)} with "
                         f"candidates {tuple(candidates.shape)}")
    cells = inputs.shape[1]
    keep = cells if num_matches is None else min(int(num_matches), cells)
    if keep < 1:
        raise ValueError(f"num_matches must be >= 1, got {num_matches}")
    nearest_distance, nearest_index = distances.min(dim=2)                             # [N, La]
    kept = nearest_distance.topk(keep, dim=1, largest=False).indices.sort(dim=1).values  # [N, k], cell order
    channels = inputs.shape[-1]
    kept_inputs = inputs.gather(1, kept[..., None].expand(-1, -1, channels))
    partners = nearest_index.gather(1, kept)
    return kept_inputs, candidates.gather(1, partners[..., None].expand(-1, -1, channels))


def _matched_terms(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """The authors' ``_vicreg_loss`` on matched cells [N, k, C]: MSE; variance over the batch of every (position,
    channel), averaged, for each side; covariance per position, averaged; each side's statistic halved."""
    return (invariance(a, b), (variance_hinge(a, eps) + variance_hinge(b, eps)) / 2,
            (covariance_penalty(a) + covariance_penalty(b)) / 2)


def vicregl_local(maps_a: torch.Tensor, maps_b: torch.Tensor, centres_a: torch.Tensor, centres_b: torch.Tensor,
                  num_matches: Sequence[int] = (20, 4), l2_num_matches: Sequence[int | None] = (None, None),
                  invariance_weight: float = 25.0, variance_weight: float = 25.0, covariance_weight: float = 1.0,
                  eps: float = VARIANCE_EPS) -> VICRegTerms:
    """VICRegL's local term between two crops' projected feature maps (the authors' ``_local_loss``).

    Two matchings, each in both directions (a -> b keeps ``[0]`` cells of a, b -> a keeps ``[1]`` cells of b):
    by feature (each cell's nearest cell of the other map in L2 distance; ``l2_num_matches``, all cells by
    default as the authors' ``l2_all_matches``) and by location (nearest cell centre in original-image
    coordinates; ``num_matches``, 20 / 4 in the paper on 7 x 7 maps). Each matched set gives VICReg terms
    (``_matched_terms``); the two directions are averaged and the two matchings added.

    Args:
        maps_a, maps_b: [N, La, C] and [N, Lb, C] projected cell features of the two crops, the global batch.
        centres_a, centres_b: [N, La, 2] and [N, Lb, 2] cell centres in original-image coordinates.
    Returns:
        ``VICRegTerms`` (weighted total and the unweighted invariance, variance, covariance sums).
    """
    if maps_a.shape[0] != maps_b.shape[0] or maps_a.shape[-1] != maps_b.shape[-1]:
        raise ValueError(f"vicregl_local: maps {tuple(maps_a.shape)} and {tuple(maps_b.shape)} differ in batch "
                         f"or channels")
    if centres_a.shape[:2] != maps_a.shape[:2] or centres_b.shape[:2] != maps_b.shape[:2]:
        raise ValueError("vicregl_local: the cell centres do not match the maps' cells")
    matchings = []
    with torch.no_grad():  # the matching is a selection: no gradient through the distances
        feature_ab = torch.cdist(maps_a.float(), maps_b.float())
        location_ab = torch.cdist(centres_a.float(), centres_b.float())
    for distances, counts in ((feature_ab, l2_num_matches), (location_ab, num_matches)):
        forward = nearest_matches(maps_a, maps_b, distances, counts[0])
        backward = nearest_matches(maps_b, maps_a, distances.transpose(1, 2), counts[1])
        matchings.append([(x + y) / 2 for x, y in zip(_matched_terms(*forward, eps), _matched_terms(*backward, eps))])
    s, v, c = (matchings[0][k] + matchings[1][k] for k in range(3))
    return VICRegTerms(invariance_weight * s + variance_weight * v + covariance_weight * c, s, v, c)
