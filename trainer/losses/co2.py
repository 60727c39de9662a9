"""CO2's consistency regulariser (Wei et al. 2021, "CO2: Consistent Contrast for Unsupervised Visual
Representation Learning"): a pure function of embeddings.

Instance discrimination labels every other image as equally negative. CO2 takes the positive crop's similarity
to the negatives as a soft pseudo label for the query's: with P the softmax (temperature tau_con) of the query's
cosines to [its positive key, the K negatives] and Q that of the positive key's cosines to [the query, the same
K negatives] (index 0 holds q.k in both), the regulariser is the symmetric KL 1/2 KL(P || Q) + 1/2 KL(Q || P),
added to the contrastive loss with weight alpha.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def co2_consistency(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor,
                    temperature: float = 0.05) -> torch.Tensor:
    """1/2 KL(P || Q) + 1/2 KL(Q || P), summed over the K + 1 entries and averaged over the N queries.

    Args:
        query: [N, D] queries; key: [N, D] their positive keys; negatives: [K, D] shared negatives (MoCo's
            queue). All normalised here; gradients flow wherever the inputs carry them (in MoCo only the query).
        temperature: tau_con (0.05 as in lightly's CO2Regularizer).
    Returns:
        Scalar symmetric KL divergence (0 when query and key coincide).
    """
    if query.shape != key.shape or query.dim() != 2:
        raise ValueError(f"expected query and key of one [N, D] shape, got {tuple(query.shape)} and {tuple(key.shape)}")
    if negatives.dim() != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must be [K, {query.shape[1]}], got {tuple(negatives.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    negatives = F.normalize(negatives, dim=1).to(query.dtype)
    positive = (query * key).sum(dim=1, keepdim=True)
    log_p = F.log_softmax(torch.cat([positive, query @ negatives.t()], dim=1) / temperature, dim=1)
    log_q = F.log_softmax(torch.cat([positive, key @ negatives.t()], dim=1) / temperature, dim=1)
    # sum_k (P - Q)(log P - log Q) = KL(P || Q) + KL(Q || P).
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1).mean()
