"""Model-aware contrastive loss (Huang et al. 2023, "Model-Aware Contrastive Learning: Towards Escaping the
Dilemmas"): pure functions of embeddings.

Two changes to NT-Xent (SimCLR's 2N anchors, each with 1 positive and 2N - 2 negatives):

* the temperature follows the model's current alignment magnitude A, the mean cosine of the positive pairs of
  the batch (no gradient): tau = tau_0 (1 + alpha (A - A_0)). Early in training (low A) the temperature
  is small, which spreads the embeddings (uniformity); as the positives align, it grows, which tolerates
  semantically similar negatives;
* each anchor's loss is reweighted by V = 1 / (1 - P+) (no gradient), P+ the softmax probability of its
  positive: the factor 1 - P+ that InfoNCE's gradient carries (small batches, easy positives) is
  cancelled, the same coupling DCL removes by dropping the positive from the denominator.

Loss: mean over anchors of -V log P+.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nce_family import two_view_similarities


def model_aware_temperature(alignment: torch.Tensor | float, temperature: float = 0.1, alpha: float = 0.5,
                            alignment_threshold: float = 0.0) -> torch.Tensor | float:
    """tau = tau_0 (1 + alpha (A - A_0)), for the alignment magnitude A (mean positive cosine)."""
    return temperature * (1.0 + alpha * (alignment - alignment_threshold))


def macl(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, alpha: float = 0.5,
         alignment_threshold: float = 0.0) -> torch.Tensor:
    """MACL on two views, mean over the 2N anchors.

    Args:
        z1, z2: [N, D] embeddings of two views, N >= 2 (row i of each is a positive pair); normalised here.
        temperature: tau_0, the base temperature (paper 0.1).
        alpha: how strongly the temperature follows the alignment (paper 0.5).
        alignment_threshold: A_0, the alignment at which tau = tau_0 (paper 0).
    Returns:
        Scalar loss. A = mean positive cosine of this batch, detached; the weights V are detached.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"macl expects two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"macl needs at least 2 pairs (the negatives are the other pairs), got {z1.shape[0]}")
    # tau is linear in A, a cosine in [-1, 1]: positive at both ends means positive for every batch.
    if min(model_aware_temperature(a, temperature, alpha, alignment_threshold) for a in (-1.0, 1.0)) <= 0:
        raise ValueError(f"temperature {temperature}, alpha {alpha}, alignment_threshold {alignment_threshold} "
                         f"give tau <= 0 for some alignment in [-1, 1]")
    positive, negatives = two_view_similarities(z1, z2)
    tau = model_aware_temperature(positive.detach().mean(), temperature, alpha, alignment_threshold)
    positive, negatives = positive / tau, negatives / tau
    margin = positive - torch.logsumexp(negatives, dim=1)  # m = log(P+ / (1 - P+))
    # -log P+ = softplus(-m) and V = 1 / (1 - P+) = 1 + e^m. Written this way, V * d(-log P+)/dm = -1 holds in
    # float32 even for easy positives (1 - P+ computed as a difference would round to 0); the exponent is capped
    # so that V stays finite (margins beyond 80 then get a vanishing gradient instead of inf / NaN).
    weights = 1.0 + torch.exp(margin.detach().clamp(max=80.0))
    return (weights * F.softplus(-margin)).mean()
