"""DenseCL's dense losses (Wang, Zhang, Shen, Kong & Li 2021, "Dense Contrastive Learning for Self-Supervised
Visual Pre-Training").

* ``dense_correspondence(query, key)``: for every cell of the query view, the index of the key view's cell with
  the largest cosine similarity (the paper's correspondence, sec. 3.3, computed on the backbone's features).
* ``densecl_loss(query, key, matches, negatives, temperature)``: the dense contrastive loss (eq. 3): each query
  cell r^i against its matched key cell t_+^i (positive) and the dense queue's keys (negatives), InfoNCE with
  temperature tau, averaged over all cells of all images; ``kind`` swaps in another loss of the InfoNCE family.

Cells come as [N, L, C]: N images, L cells of a feature map (row-major, ``trainer.models.dense.cells``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nce_family import contrastive_loss_from_similarities


def _check_cells(query: torch.Tensor, key: torch.Tensor) -> None:
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"expected [N, L, C] query and key cells with equal N and C, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")


def dense_correspondence(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """For each query cell, the key cell of the same image it is most similar to (argmax of the cosine).

    Args:
        query: [N, Lq, C] backbone cells of the query view.
        key: [N, Lk, C] backbone cells of the key view.
    Returns:
        [N, Lq] int64 indices into the key cells (ties: the first index).
    """
    _check_cells(query, key)
    with torch.no_grad():
        similarity = torch.bmm(F.normalize(query, dim=-1), F.normalize(key, dim=-1).transpose(1, 2))  # [N, Lq, Lk]
        return similarity.argmax(dim=2)


def densecl_loss(query: torch.Tensor, key: torch.Tensor, matches: torch.Tensor, negatives: torch.Tensor,
                 temperature: float = 0.2, kind: str = "infonce", **options) -> torch.Tensor:
    """Dense contrastive loss (DenseCL eq. 3), mean over the N x Lq query cells:

        L = -log exp(r . t_+ / tau) / (exp(r . t_+ / tau) + sum_k exp(r . t_k / tau))

    with r a query cell, t_+ = key[matches] its matched key cell and t_k the dense queue (all L2-normalised here).

    Args:
        query: [N, Lq, D] dense projections of the query view (with gradient).
        key: [N, Lk, D] dense projections of the key view (momentum encoder; detach outside).
        matches: [N, Lq] int64, the key cell of each query cell (``dense_correspondence``).
        negatives: [K, D] the dense queue.
        temperature: tau (0.2 in the paper, MoCo v2's).
        kind, options: a loss of ``trainer.losses.CONTRASTIVE_LOSSES`` and its options (default InfoNCE).
    Returns: a scalar.
    """
    _check_cells(query, key)
    if matches.shape != query.shape[:2]:
        raise ValueError(f"matches {tuple(matches.shape)} must be [N, Lq] = {tuple(query.shape[:2])}")
    if negatives.dim() != 2 or negatives.shape[1] != query.shape[2]:
        raise ValueError(f"negatives must be [K, {query.shape[2]}], got {tuple(negatives.shape)}")
    q = F.normalize(query, dim=-1)
    matched = torch.gather(F.normalize(key, dim=-1), 1, matches.unsqueeze(-1).expand(-1, -1, key.shape[2]))
    q = q.reshape(-1, q.shape[2])
    positive = (q * matched.reshape(-1, q.shape[1])).sum(dim=1)                       # [N Lq]
    negative = q @ F.normalize(negatives, dim=1).to(q.dtype).t()                      # [N Lq, K]
    return contrastive_loss_from_similarities(kind, positive, negative, temperature, **options)
