"""Counting loss (Noroozi, Pirsiavash & Favaro 2017, "Representation Learning by Learning to Count", eq. 6)."""
from __future__ import annotations

import torch


def counting_loss(downsampled: torch.Tensor, tiles: torch.Tensor, other_downsampled: torch.Tensor,
                  margin: float = 10.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counting features of the 2x-downsampled image should equal the sum over its 2x2 tiles, and differ
    from those of another image's downsampled copy by at least ``margin`` (squared distance):

        l = ||phi(D x) - sum_i phi(T_i x)||^2 + max(0, M - ||phi(D y) - sum_i phi(T_i x)||^2)

    averaged over the batch. The paper's y is one other image; the hinge is an expectation over y, so
    ``other_downsampled`` may also hold K other images per x ([N, K, D]), whose hinges are averaged (a
    lower-variance estimate of the same loss).

    Args:
        downsampled: [N, D] phi(D x). tiles: [N, T, D] phi(T_i x) of the T tiles. other_downsampled: [N, D]
            phi(D y) of another image y for each x, or [N, K, D] for K others. margin: M (10 in the paper).
    Returns:
        (loss, the mean counting term, the mean contrastive hinge term), scalars.
    """
    other_ok = other_downsampled.shape == downsampled.shape or (
        other_downsampled.dim() == 3 and other_downsampled.shape[0] == downsampled.shape[0]
        and other_downsampled.shape[2] == downsampled.shape[1])
    if tiles.dim() != 3 or downsampled.shape != (tiles.shape[0], tiles.shape[2]) or not other_ok:
        raise ValueError(f"counting_loss: expected downsampled [N, D], tiles [N, T, D], other [N, D] or [N, K, D]; "
                         f"got {tuple(downsampled.shape)}, {tuple(tiles.shape)}, {tuple(other_downsampled.shape)}")
    total = tiles.sum(dim=1)
    counting = ((downsampled - total) ** 2).sum(dim=1)
    others = other_downsampled if other_downsampled.dim() == 3 else other_downsampled[:, None]
    contrastive = (margin - ((others - total[:, None]) ** 2).sum(dim=2)).clamp_min(0.0).mean(dim=1)
    return (counting + contrastive).mean(), counting.mean(), contrastive.mean()
