"""Losses of the nearest-neighbour contrastive family: NNCLR's neighbour contrast (Dwibedi et al. 2021, "With a
Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations"), which All4One
reuses, and All4One's centroid and feature contrast (Estepa et al. 2023, "All4One: Symbiotic Neighbour
Contrastive Learning via Self-Attention and Redundancy Reduction"). Pure functions of tensors: the objective
gathers the global batch and looks the neighbours up.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .contrastive import info_nce
from .nce_family import contrastive_loss_from_similarities, similarities


def neighbour_contrast(neighbours: torch.Tensor, predictions: torch.Tensor, temperature: float = 0.1,
                       symmetric: bool = True, kind: str = "infonce", **options) -> torch.Tensor:
    """NNCLR's loss for one pair of views (Dwibedi et al. 2021, eq. 2, with sec. 3.2's symmetrisation).

    Row i's positive pair is (NN(z_i), p_i+): the support-set neighbour of one view's projection and the other
    view's prediction. Eq. 2 takes each neighbour as the anchor, with the other rows' predictions as its
    negatives: -log e^{NN(z_i).p_i/t} / sum_k e^{NN(z_i).p_k/t}. ``symmetric`` adds the transposed term of the
    paper's implementation details, each prediction as the anchor with the other rows' neighbours as negatives:
    -log e^{NN(z_i).p_i/t} / sum_k e^{NN(z_k).p_i/t}; the loss is the mean over the 2N anchors.

    Args:
        neighbours: [N, D] nearest neighbours NN(z_i) of view 1's projections (constants: no gradient).
        predictions: [N, D] predictor outputs p_i+ of view 2. Both are L2-normalised here.
        temperature: tau (paper 0.1).
        symmetric: add the prediction-anchored term (NNCLR); False is eq. 2 alone (solo-learn, All4One).
        kind, options: a loss of the InfoNCE family (``trainer.losses.nce_family``) over the same positive
            and N - 1 negatives per anchor; "infonce" is the paper's.
    Returns:
        Scalar mean over anchors. NNCLR averages it over the two view orders, (NN(z1), p2) and (NN(z2), p1).
    """
    positive, negatives = similarities(neighbours, predictions)
    if symmetric:
        positive_t, negatives_t = similarities(predictions, neighbours)
        positive, negatives = torch.cat([positive, positive_t]), torch.cat([negatives, negatives_t])
    return contrastive_loss_from_similarities(kind, positive, negatives, temperature, **options)


def centroid_contrast(centroids1: torch.Tensor, shifted1: torch.Tensor, centroids2: torch.Tensor,
                      shifted2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """All4One's centroid contrast (Estepa et al. 2023): InfoNCE between the centroid of one view's
    neighbours and the shifted-sequence centroid of the other view, symmetrised over the two views.

    Args:
        centroids1, centroids2: [N, D] transformer outputs (first token) over the k neighbours of view 1 / 2.
        shifted1, shifted2: [N, D] transformer outputs over (own prediction, k - 1 first neighbours) of view 1 / 2.
        temperature: tau (the authors' code: 0.1).
    Returns:
        (InfoNCE(centroids1 -> shifted2) + InfoNCE(centroids2 -> shifted1)) / 2, each anchored on the centroid
        with the other rows' shifted centroids as negatives; inputs are L2-normalised here.
    """
    return 0.5 * (info_nce(centroids1, shifted2, temperature=temperature)
                  + info_nce(centroids2, shifted1, temperature=temperature))


def feature_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[D, D] cosine similarities between the feature columns of ``a`` and ``b`` [N, D] (each column
    L2-normalised over the batch): the embeddings transposed, features as the samples."""
    return F.normalize(a, dim=0).t() @ F.normalize(b, dim=0)


def feature_contrast(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """All4One's feature contrast, redundancy reduction over the feature dimension (Estepa et al. 2023,
    in the form of the authors' code).

    For each pair (a, b) of [N, D] embeddings, C = ``feature_correlation(a, b)``: C_jj is the cosine between
    feature j's column in both views (pulled to 1), C_jl for j != l between different features (pushed to 0).
    Loss = (sqrt(mean over pairs of mean_j (C_jj - 1)^2) + sqrt(mean over pairs of mean_{j!=l} C_jl^2)) / 2.
    The authors pair the momentum projections of each view with the online projections of the other.

    Args:
        pairs: (a, b) tensors of one [N, D] shape each, D >= 2, rows aligned (row i of both is image i).
    Returns:
        A scalar in [0, 2]; 0 when every C is the identity.
    """
    if not pairs:
        raise ValueError("feature_contrast needs at least one (a, b) pair")
    on, off = [], []
    for a, b in pairs:
        if a.shape != b.shape or a.dim() != 2 or a.shape[1] < 2:
            raise ValueError(f"feature_contrast needs [N, D >= 2] pairs of one shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        c = feature_correlation(a.float(), b.float())
        diagonal = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        on.append((c[diagonal] - 1.0).pow(2).mean())
        off.append(c[~diagonal].pow(2).mean())
    # The clamp keeps sqrt's gradient finite at an exact optimum (where the code's sqrt(0) would give NaN).
    on_term = torch.stack(on).mean().clamp_min(1e-12).sqrt()
    off_term = torch.stack(off).mean().clamp_min(1e-12).sqrt()
    return 0.5 * (on_term + off_term)
