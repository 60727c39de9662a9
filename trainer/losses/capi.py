"""CAPI's losses (Darcet et al. 2025, "Cluster and Predict Latent Patches for Improved Masked Image Modeling",
sec. 3; the authors' ``train_capi.py`` and ``OnlineClustering``).

The teacher's patch features x (an EMA of the student encoder, on the whole image) are scored against K learnable
prototypes, logits = W normalise(x) + b (the online clustering head). Their targets are soft assignments from
Sinkhorn-Knopp done PER POSITION (``capi_targets``): for each patch position l, Q_l = exp(logits_l / tau_t) over
the n images of the global batch x K clusters, then ``iterations`` rounds of "each cluster's column sums to 1 over
the batch, then each image's row sums to 1 over the clusters" (the authors' ``sinkhorn_knopp`` on the
[L, n, K] logits, column sums all-reduced across processes). Balancing per position rather than over all patches
keeps the clusters from encoding position.

``capi_loss`` sums two cross-entropies of the same form, H(q, p) = -sum_k q_k log softmax(z / tau)_k, averaged
over tokens:

* prediction: the student's logits at the P predicted (masked) patches against the targets there (tau_s 0.12);
  it trains the student encoder, predictor and head;
* clustering: the clustering head's own logits at EVERY teacher patch against the targets (tau_p 0.12); it trains
  only the prototypes (the teacher features carry no gradient), the authors' ``OnlineClustering`` loss.

The targets carry no gradient. The functions know nothing of processes: ``reduce_sum`` / ``reduce_max`` (Sinkhorn's
sums and the stabilising maximum over the batch) and ``reduce_mean`` (a per-token mean -> the global batch's)
default to the identity for one holder of the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class CAPITerms(NamedTuple):
    loss: torch.Tensor  # prediction + clustering
    prediction: torch.Tensor  # H(targets, student) at the predicted patches
    clustering: torch.Tensor  # H(targets, clustering head) at every teacher patch


@torch.no_grad()
def capi_targets(logits: torch.Tensor, temperature: float = 0.06, iterations: int = 3,
                 reduce_sum: Reduce = _identity, reduce_max: Reduce = _identity, eps: float = 1e-8) -> torch.Tensor:
    """Position-wise Sinkhorn-Knopp assignments of patches to clusters (the authors' ``sinkhorn_knopp``).

    Args:
        logits: [n, L, K] clustering logits of n images' L patches (this process's images).
        temperature: tau_t of the targets (paper 0.06).
        iterations: Sinkhorn rounds (paper 3), each: divide every (position, cluster) column by its sum over the
            images of the global batch, then every (image, position) row by its sum over the clusters.
        reduce_sum, reduce_max: the sum / maximum of a tensor over every holder of a part of the batch.
        eps: added to every divisor (the authors' 1e-8).
    Returns:
        [n, L, K] float32 targets, each row a distribution over the K clusters.
    """
    if logits.dim() != 3:
        raise ValueError(f"capi_targets expects logits [n, L, K], got {tuple(logits.shape)}")
    if temperature <= 0 or iterations < 1:
        raise ValueError(f"capi_targets needs temperature > 0 and iterations >= 1, got {temperature}, {iterations}")
    scores = logits.detach().double() / temperature
    # float64 and each column's maximum over the global batch subtracted: exp() cannot overflow, every column keeps
    # an entry of 1, and the shift cancels in the first column normalisation.
    q = torch.exp(scores - reduce_max(scores.amax(dim=0, keepdim=True)))
    for _ in range(iterations):
        q = q / (reduce_sum(q.sum(dim=0, keepdim=True)) + eps)
        q = q / (q.sum(dim=-1, keepdim=True) + eps)
    return q.float()


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of -sum_k targets_k log softmax(logits / temperature)_k; logits and targets [..., K]."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_probabilities = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(targets.detach().float() * log_probabilities).sum(dim=-1).mean()


def capi_loss(student_logits: torch.Tensor, targets: torch.Tensor, clustering_logits: torch.Tensor,
              clustering_targets: torch.Tensor, student_temperature: float = 0.12,
              clustering_temperature: float = 0.12, reduce_mean: Reduce = _identity) -> CAPITerms:
    """CAPI's loss: the student's prediction of the masked patches' clusters plus the online clustering loss.

    Args:
        student_logits: [n, P, K] the student head's logits at P predicted patches per image; gradient flows here.
        targets: [n, P, K] ``capi_targets`` at those patches (no gradient).
        clustering_logits: [n, L, K] the clustering head's logits at every teacher patch; gradient flows to the
            prototypes through them.
        clustering_targets: [n, L, K] ``capi_targets`` of ``clustering_logits`` (no gradient).
        student_temperature: tau_s (paper 0.12).
        clustering_temperature: tau_p of the clustering head's prediction (the authors' ``pred_temp``, 0.12).
        reduce_mean: this caller's per-token mean -> the global batch's (equal token counts per process).
    Returns:
        ``CAPITerms`` (loss, prediction, clustering), scalars.
    """
    prediction = reduce_mean(_soft_cross_entropy(student_logits, targets, student_temperature))
    clustering = reduce_mean(_soft_cross_entropy(clustering_logits, clustering_targets, clustering_temperature))
    return CAPITerms(prediction + clustering, prediction, clustering)
