"""Jigsaw Clustering losses (Chen, Liu, Cheng, Chen, Cai & Jia 2021, "Jigsaw Clustering for Unsupervised Visual
Representation Learning"): the clustering loss over patch embeddings, where the patches cut from the same source
image are positives of each other. (The location loss is a plain m*m-way cross-entropy.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clustering_loss(embeddings: torch.Tensor, sources: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Contrastive clustering of patches: for every patch i with positives P(i) (other patches of its source image)
    and A(i) all patches but i,

        l_i = -1/|P(i)| sum_{j in P(i)} log( exp(cos(z_i, z_j) / t) / sum_{k in A(i)} exp(cos(z_i, z_k) / t) )

    averaged over the patches that have a positive (none: 0).

    Args:
        embeddings: [P, D] patch embeddings (L2-normalised here). sources: [P] int, the source image of each patch.
        temperature: t.
    Returns:
        Scalar loss.
    """
    if embeddings.dim() != 2 or sources.shape != embeddings.shape[:1]:
        raise ValueError(f"clustering_loss: embeddings [P, D] and sources [P], got {tuple(embeddings.shape)}, "
                         f"{tuple(sources.shape)}")
    z = F.normalize(embeddings.float(), dim=1)
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (sources[:, None] == sources[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0
    mean_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / counts.clamp_min(1)
    return -mean_log_prob[has_positive].mean()
