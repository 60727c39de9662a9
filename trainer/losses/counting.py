"""Counting loss (Noroozi, Pirsiavash & Favaro 2017, "Representation Learning by Learning to Count", eq. 6)."""
from __future__ import annotations

import torch


def counting_loss(downsampled: torch.Tensor, tiles: torch.Tensor, other_downsampled: torch.Tensor,
                  margin: float = 10.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counting features of the 2x-downsampled image should equal the sum over its 2x2 tiles, and differ
    from those of another image's downsampled copy by at least ``margin`` (squared distance):

        l = ||phi(D x) - sum_i phi(T_i x)||^2 + max(0, M - ||phi(D y) - sum_i phi(T_i x)||^2)

    averaged over the batch.

    Args:
        downsampled: [N, D] phi(D x). tiles: [N, T, D] phi(T_i x) of the T tiles. other_downsampled: [N, D]
            phi(D y) of another image y for each x. margin: M (10 in the paper).
    Returns:
        (loss, the mean counting term, the mean contrastive hinge term), scalars.
    """
    if tiles.dim() != 3 or downsampled.shape != (tiles.shape[0], tiles.shape[2]) or other_downsampled.shape != downsampled.shape:
        raise ValueError(f"counting_loss: expected downsampled [N, D], tiles [N, T, D], other [N, D]; got "
                         f"{tuple(downsampled.shape)}, {tuple(tiles.shape)}, {tuple(other_downsampled.shape)}")
    total = tiles.sum(dim=1)
    counting = ((downsampled - total) ** 2).sum(dim=1)
    contrastive = (margin - ((other_downsampled - total) ** 2).sum(dim=1)).clamp_min(0.0)
    return (counting + contrastive).mean(), counting.mean(), contrastive.mean()
