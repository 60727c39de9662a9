"""DetCon's object-level losses (Hénaff, Koppula, Alayrac, van den Oord, Vinyals & Carreira 2021, "Efficient
Visual Pretraining with Contrastive Detection").

Inputs are mask-pooled vectors, one per sampled mask: [B, M, D] for B images and M mask slots per image, with
the slots' mask ids [B, M] (int; an id may repeat within an image when fewer masks than slots exist). A slot's
positives are the slots of the SAME image whose id is equal, in the OTHER view.

* ``detcon_loss``: the contrastive detection objective (paper eq. 2, as in the authors' code): each query slot is
  scored against every slot of the other view's keys and of its own view's keys (all images), except the keys
  of its own view with its own id and image (itself and its repeats); cross-entropy towards its positives
  (weight 1/#positives each), temperature tau = 0.1. A slot's term is divided by how often its id repeats in its
  view (every region counts once), slots without a positive count 0; mean over the B x M slots, and the two
  directions (view-0 queries, view-1 queries) are summed. DetCon_S passes the same (online) vectors as
  queries and keys; DetCon_B passes its predictor outputs as queries and the target network's as keys.
* ``detcon_regression``: the same pairing with BYOL's normalised MSE 2 - 2 cos(query, key) in place of the
  cross-entropy (no negatives), the same weights and sum over directions.

The objective gathers every process's slots before calling these (negatives come from the global batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(tensors: tuple[torch.Tensor, ...], ids: tuple[torch.Tensor, ...]) -> None:
    shape = tensors[0].shape
    if tensors[0].dim() != 3 or any(t.shape != shape for t in tensors):
        raise ValueError(f"detcon losses take [B, M, D] vectors of one shape, got {[tuple(t.shape) for t in tensors]}")
    if any(i.shape != shape[:2] for i in ids):
        raise ValueError(f"mask ids must be [B, M] = {tuple(shape[:2])}, got {[tuple(i.shape) for i in ids]}")


def _same_region(ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """[B M, B M] bool: slot (n, i) of a and slot (n', j) of b show the same region (n == n', equal ids)."""
    b, m = ids_a.shape
    same_image = torch.eye(b, dtype=torch.bool, device=ids_a.device)[:, None, :, None]
    equal = ids_a[:, :, None, None] == ids_b[None, None, :, :]
    return (same_image & equal).reshape(b * m, b * m)


def _slot_weights(positives: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    """[B M]: 1 / (repeats of the slot's id in its own view) where the slot has a positive, else 0."""
    return (positives.any(dim=1)).to(torch.float32) / repeats.sum(dim=1).to(torch.float32)


def _contrastive_direction(query: torch.Tensor, other: torch.Tensor, own: torch.Tensor, ids_query: torch.Tensor,
                           ids_other: torch.Tensor, temperature: float) -> torch.Tensor:
    d = query.shape[2]
    q = F.normalize(query, dim=-1).reshape(-1, d)
    keys = torch.cat([F.normalize(other, dim=-1).reshape(-1, d), F.normalize(own, dim=-1).reshape(-1, d)])
    logits = (q @ keys.t()).float() / temperature                                       # [B M, 2 B M]
    positives = _same_region(ids_query, ids_other)
    repeats = _same_region(ids_query, ids_query)                                         # itself included
    excluded = torch.cat([torch.zeros_like(repeats), repeats], dim=1)
    log_probability = logits.masked_fill(excluded, float("-inf")).log_softmax(dim=1)[:, :q.shape[0]]
    count = positives.sum(dim=1)
    # Only the other view's columns are read (none excluded there), so no -inf meets a zero weight.
    cross_entropy = -(log_probability * positives).sum(dim=1) / count.clamp_min(1)
    return (_slot_weights(positives, repeats) * cross_entropy).mean()


def detcon_loss(query0: torch.Tensor, query1: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor,
                ids0: torch.Tensor, ids1: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The contrastive detection loss, summed over both directions (see the module docstring).

    Args:
        query0, query1: [B, M, D] mask-pooled queries of view 0 / view 1 (online projections or predictions).
        key0, key1: [B, M, D] mask-pooled keys of view 0 / view 1 (the queries themselves for DetCon_S, the
            target network's projections for DetCon_B); L2-normalised here, as are the queries.
        ids0, ids1: [B, M] int mask ids of the slots in view 0 / view 1.
        temperature: tau (0.1 in the paper).
    Returns: a scalar.
    """
    _check((query0, query1, key0, key1), (ids0, ids1))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return (_contrastive_direction(query0, key1, key0, ids0, ids1, temperature)
            + _contrastive_direction(query1, key0, key1, ids1, ids0, temperature))


def _regression_direction(query: torch.Tensor, other: torch.Tensor, ids_query: torch.Tensor,
                          ids_other: torch.Tensor) -> torch.Tensor:
    d = query.shape[2]
    cosine = F.normalize(query, dim=-1).reshape(-1, d) @ F.normalize(other, dim=-1).reshape(-1, d).t()
    positives = _same_region(ids_query, ids_other)
    count = positives.sum(dim=1)
    error = ((2.0 - 2.0 * cosine.float()) * positives).sum(dim=1) / count.clamp_min(1)
    return (_slot_weights(positives, _same_region(ids_query, ids_query)) * error).mean()


def detcon_regression(query0: torch.Tensor, query1: torch.Tensor, key0: torch.Tensor, key1: torch.Tensor,
                      ids0: torch.Tensor, ids1: torch.Tensor) -> torch.Tensor:
    """BYOL's 2 - 2 cos between each query slot and its positives in the other view's keys (mean over them),
    weighted as ``detcon_loss`` and summed over both directions. Shapes as ``detcon_loss``; no negatives."""
    _check((query0, query1, key0, key1), (ids0, ids1))
    return _regression_direction(query0, key1, ids0, ids1) + _regression_direction(query1, key0, ids1, ids0)
