"""Collapse diagnostics every objective can report (BYOL/SimSiam/DINO-style objectives can collapse silently).

``embedding_std(z)``: the per-dimension standard deviation of the L2-normalised embeddings, averaged over
dimensions and multiplied by sqrt(D) (SimSiam sec. 4.1 reports the raw std, which is 1/sqrt(D) for
embeddings spread over the sphere). So about 1.0 means spread out and 0.0 means every image maps to the same
point. The training loop logs it and flags a run whose value stays under ``COLLAPSE_THRESHOLD``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COLLAPSE_THRESHOLD = 0.05  # a std ratio this low means (near-)constant embeddings


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of ``F.normalize(z)`` times sqrt(D), a scalar; z: [N, D] with N >= 2."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_std needs [N >= 2, D] embeddings, got {tuple(z.shape)}")
    normalised = F.normalize(z.detach().float(), dim=1)
    return normalised.std(dim=0).mean() * (z.shape[1] ** 0.5)


def is_collapsed(std_ratio: float) -> bool:
    return std_ratio < COLLAPSE_THRESHOLD
