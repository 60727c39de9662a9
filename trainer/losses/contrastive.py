"""InfoNCE-family contrastive losses: pure functions of embeddings (no device, rank or config)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1), averaged over all 2N anchors.

    Args:
        z1, z2: [N, D] embeddings of two views; row i of z1 and row i of z2 are positives. Normalised here.
        temperature: tau.
    Returns:
        Scalar loss. Each anchor has 1 positive and 2(N-1) negatives (the other views of the batch).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018; MoCo's form), mean over queries.

    Args:
        query: [N, D]; positive_key: [N, D] (row i is query i's positive).
        negative_keys: [K, D] shared negatives (a queue or bank); when None, the other rows of
            ``positive_key`` are the negatives (MoCo v3 / in-batch).
    All inputs are L2-normalised here.
    """
    query = F.normalize(query, dim=1)
    positive_key = F.normalize(positive_key, dim=1)
    if negative_keys is None:
        logits = query @ positive_key.t()
        targets = torch.arange(query.shape[0], device=query.device)
    else:
        negative_keys = F.normalize(negative_keys, dim=1)
        positive = (query * positive_key).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, query @ negative_keys.t()], dim=1)
        targets = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits / temperature, targets)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021): mean of image->text and text->image.

    Args:
        image_features, text_features: [N, D]; row i of each is a matching pair. Normalised here.
        logit_scale: the (already exponentiated) inverse temperature.
    """
    image_features = F.normalize(image_features, dim=1)
    text_features = F.normalize(text_features, dim=1)
    logits = logit_scale * image_features @ text_features.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
