"""Prototype-matching losses of MSN (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning")
and PMSN (Assran et al. 2023, "The Hidden Uniform Cluster Prior in Self-Supervised Learning").

An embedding z is turned into a prediction over K learnable prototypes c_k, p = softmax(cos(z, c) / tau)
(``prototype_log_probabilities``). The target of an image is the prediction of its unmasked view by the
target encoder at the sharper temperature tau+ (``msn_targets``; the authors' code sharpens p at 0.1 by
T = 0.25, the same as tau+ = 0.025), optionally balanced by Sinkhorn-Knopp over the global batch. The loss of
V anchor (masked) views of n images is

    H(p+, p) = -1/(V n) sum_{v, i} sum_k p+_ik log p_vik      (cross-entropy, averaged over the anchors)
    + lambda R(p_bar),   p_bar = mean of p over every anchor of the global batch

with R the mean-entropy maximisation of MSN, R = log K - H(p_bar) = KL(p_bar || uniform) (``mean_entropy``,
the authors' ``me_max`` term with its constant log K), or PMSN's KL(p_bar || rho) to a power-law prior
rho_k ∝ k^-tau (``prior_kl``, ``power_law_prior``). With a uniform rho the two regularisers are equal.

The functions know nothing of processes: ``reduce_mean`` maps a quantity averaged over this caller's rows to
its average over every holder of a part of the batch (the objective passes an all-gather-and-mean with
gradient), so p_bar and the reported cross-entropy are the global batch's; the identity when the caller holds
the whole batch. Targets take ``reduce_sum`` / ``reduce_max`` for Sinkhorn as ``trainer.losses.clustering.sinkhorn``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .clustering import sinkhorn

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class MSNTerms(NamedTuple):
    loss: torch.Tensor  # cross_entropy + weight * regulariser
    cross_entropy: torch.Tensor  # H(p+, p) over every anchor of the global batch
    regulariser: torch.Tensor  # R(p_bar), before the weight
    mean_probabilities: torch.Tensor  # p_bar [K]


def prototype_log_probabilities(embeddings: torch.Tensor, prototypes: torch.Tensor,
                                temperature: float) -> torch.Tensor:
    """log softmax(cos(z, c_k) / temperature) over the K prototypes.

    Args:
        embeddings: [N, D] z (any norm; normalised here).
        prototypes: [K, D] c (any norm; normalised here).
        temperature: tau (> 0): 0.1 for anchors in both papers.
    Returns:
        [N, K] float32 log-probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cosines = F.normalize(embeddings.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).t()
    return F.log_softmax(cosines / temperature, dim=-1)


@torch.no_grad()
def msn_targets(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.025,
                sinkhorn_iterations: int = 0, reduce_sum: Reduce = _identity, reduce_max: Reduce = _identity,
                total_samples: int | None = None) -> torch.Tensor:
    """Sharpened targets p+ = softmax(cos(z+, c) / tau+), optionally Sinkhorn-balanced (no gradient).

    Args:
        embeddings: [n, D] z+ of the target views (target encoder, unmasked).
        prototypes: [K, D] c.
        temperature: tau+ (0.025 in the paper: anchor tau 0.1 sharpened by T = 0.25).
        sinkhorn_iterations: 0 for none; else rounds of Sinkhorn-Knopp on p+ (the authors' code: 3), with
            each prototype's mass equalised over the global batch (sums through ``reduce_sum``).
        reduce_sum, reduce_max, total_samples: as ``trainer.losses.clustering.sinkhorn`` (identity /
            None when this call holds the whole batch).
    Returns:
        [n, K] float32 target distributions (rows sum to 1).
    """
    log_targets = prototype_log_probabilities(embeddings, prototypes, temperature)
    if sinkhorn_iterations <= 0:
        return log_targets.exp()
    # Sinkhorn of exp(scores / epsilon) with scores = log p+ and epsilon = 1 starts from p+ itself, as the
    # authors' distributed_sinkhorn does (its global-max shift cancels in the first normalisation).
    return sinkhorn(log_targets, 1.0, sinkhorn_iterations, reduce_sum=reduce_sum, reduce_max=reduce_max,
                    total_samples=total_samples)


def power_law_prior(k: int, tau: float = 0.25) -> torch.Tensor:
    """PMSN's prior over K prototypes: rho_k ∝ k^-tau for k = 1..K, normalised; [K] float32 (paper: tau 0.25)."""
    if k < 1 or tau < 0:
        raise ValueError(f"power_law_prior needs k >= 1 and tau >= 0, got {k} and {tau}")
    weights = torch.arange(1, k + 1, dtype=torch.float64) ** -float(tau)
    return (weights / weights.sum()).float()


def mean_entropy(mean_probabilities: torch.Tensor) -> torch.Tensor:
    """MSN's regulariser: log K - H(p_bar) = KL(p_bar || uniform) >= 0, zero when p_bar is uniform.

    Args:
        mean_probabilities: [K] p_bar, the mean anchor prediction over the global batch.
    """
    count = mean_probabilities.shape[-1]
    entropy = -torch.special.xlogy(mean_probabilities, mean_probabilities).sum()
    return math.log(count) - entropy


def prior_kl(mean_probabilities: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """PMSN's regulariser: KL(p_bar || rho) = sum_k p_bar_k (log p_bar_k - log rho_k) >= 0.

    Args:
        mean_probabilities: [K] p_bar, the mean anchor prediction over the global batch.
        prior: [K] rho, a distribution with no zero entry (``power_law_prior``).
    """
    if prior.shape != mean_probabilities.shape:
        raise ValueError(f"prior {tuple(prior.shape)} and mean prediction {tuple(mean_probabilities.shape)} differ")
    prior = prior.to(mean_probabilities)
    return (torch.special.xlogy(mean_probabilities, mean_probabilities) - mean_probabilities * prior.log()).sum()


def _cross_entropy_and_mean(anchor_log_probabilities: torch.Tensor, targets: torch.Tensor,
                            reduce_mean: Reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """(H(p+, p) over every anchor, p_bar [K]), both averaged over the global batch through ``reduce_mean``."""
    if anchor_log_probabilities.dim() != 3 or targets.shape != anchor_log_probabilities.shape[1:]:
        raise ValueError(f"expected anchor log-probabilities [V, n, K] and targets [n, K], got "
                         f"{tuple(anchor_log_probabilities.shape)} and {tuple(targets.shape)}")
    cross_entropy = -(targets.detach().unsqueeze(0) * anchor_log_probabilities).sum(dim=-1).mean()
    mean_probabilities = anchor_log_probabilities.exp().mean(dim=(0, 1))
    return reduce_mean(cross_entropy), reduce_mean(mean_probabilities)


def msn(anchor_log_probabilities: torch.Tensor, targets: torch.Tensor, regularisation_weight: float = 1.0,
        reduce_mean: Reduce = _identity) -> MSNTerms:
    """MSN's loss: H(p+, p) averaged over the anchors + lambda (log K - H(p_bar)) (MSN eq. 3 with me-max).

    Args:
        anchor_log_probabilities: [V, n, K] log p of V anchor views of n images
            (``prototype_log_probabilities`` at tau 0.1); gradient flows here.
        targets: [n, K] p+ of the same n images (``msn_targets``); no gradient.
        regularisation_weight: lambda (1 in the paper).
        reduce_mean: this caller's average -> the global batch's average (identity for the whole batch).
    """
    cross_entropy, mean_probabilities = _cross_entropy_and_mean(anchor_log_probabilities, targets, reduce_mean)
    regulariser = mean_entropy(mean_probabilities)
    return MSNTerms(cross_entropy + regularisation_weight * regulariser, cross_entropy, regulariser,
                    mean_probabilities)


def pmsn(anchor_log_probabilities: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor,
         regularisation_weight: float = 1.0, reduce_mean: Reduce = _identity) -> MSNTerms:
    """PMSN's loss: H(p+, p) averaged over the anchors + lambda KL(p_bar || rho) (PMSN sec. 4).

    Args: as ``msn``, plus ``prior`` [K] rho (``power_law_prior(K, 0.25)`` in the paper).
    """
    cross_entropy, mean_probabilities = _cross_entropy_and_mean(anchor_log_probabilities, targets, reduce_mean)
    regulariser = prior_kl(mean_probabilities, prior)
    return MSNTerms(cross_entropy + regularisation_weight * regulariser, cross_entropy, regulariser,
                    mean_probabilities)
