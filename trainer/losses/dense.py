"""Dense (cell-level) losses: PixContrast and PixPro (Xie et al. 2021, "Propagate Yourself"), PatchNCE (Park et
al. 2020, "Contrastive Learning for Unpaired Image-to-Image Translation", CUT).

Features come as [N, L, C]: N images, L cells of a feature map (row-major), C channels; every loss
L2-normalises them first, so scores are cosines. Which cell pairs are positive is given as a boolean mask
(PixPro: from the two crops' geometry, ``trainer.data.crop_geometry.positive_pairs``; PatchNCE: the same
sampled location).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(query: torch.Tensor, key: torch.Tensor) -> None:
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"dense losses take [N, L, C] features with equal N and C, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")


def pixel_contrast(query: torch.Tensor, key: torch.Tensor, positives: torch.Tensor, temperature: float = 0.3,
                   batch_negatives: bool = False) -> torch.Tensor:
    """PixContrast (PixPro paper eq. 2), averaged over the query cells that have at least one positive:

        L(i) = -log  sum_{j in P(i)} exp(cos(q_i, k_j) / t)  /  sum_{j in P(i) + N(i)} exp(cos(q_i, k_j) / t)

    P(i): key cells of the same image with ``positives[n, i, j]``; N(i): the other cells of that image's key view
    (the paper), plus every cell of the other images when ``batch_negatives``. No such query cell: 0.

    Args:
        query: [N, La, C] cells of the first view (online encoder).
        key: [N, Lb, C] cells of the second view (momentum encoder).
        positives: [N, La, Lb] bool.
        temperature: t (0.3 in the paper).
    Returns: a scalar.
    """
    _check(query, key)
    n, la, lb = positives.shape
    if (n, la, lb) != (query.shape[0], query.shape[1], key.shape[1]):
        raise ValueError(f"positives {tuple(positives.shape)} do not match query {tuple(query.shape)} / key {tuple(key.shape)}")
    q, k = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    if batch_negatives:
        logits = q.reshape(n * la, -1) @ k.reshape(n * lb, -1).t() / temperature            # [N La, N Lb]
        same_image = torch.eye(n, dtype=torch.bool, device=q.device)[:, None, :, None]      # [N, 1, N, 1]
        mask = (same_image & positives[:, :, None, :]).reshape(n * la, n * lb)
    else:
        logits = torch.bmm(q, k.transpose(1, 2)).reshape(n * la, lb) / temperature          # [N La, Lb]
        mask = positives.reshape(n * la, lb)
    anchored = mask.any(dim=1)
    if not anchored.any():
        return logits.sum() * 0.0
    log_probability = logits.masked_fill(~mask, float("-inf")).logsumexp(dim=1) - logits.logsumexp(dim=1)
    return -log_probability[anchored].mean()


def pixpro_consistency(propagated: torch.Tensor, target: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """PixPro's pixel-to-propagation consistency (paper eq. 5, one direction): minus the mean cosine between
    propagated online cells y_i and target cells x'_j over the positive pairs (i, j) of each image, averaged
    over the images that have at least one positive pair (0 when none has).

    Args:
        propagated: [N, La, C] pixel-propagation module outputs of the first view.
        target: [N, Lb, C] momentum-encoder cells of the second view.
        positives: [N, La, Lb] bool.
    Returns: a scalar in [-1, 1].
    """
    _check(propagated, target)
    if positives.shape != (propagated.shape[0], propagated.shape[1], target.shape[1]):
        raise ValueError(f"positives {tuple(positives.shape)} do not match {tuple(propagated.shape)} / {tuple(target.shape)}")
    cosines = torch.bmm(F.normalize(propagated, dim=-1), F.normalize(target, dim=-1).transpose(1, 2))
    weights = positives.to(cosines.dtype)
    counts = weights.sum(dim=(1, 2))
    has_pairs = counts > 0
    if not has_pairs.any():
        return cosines.sum() * 0.0
    per_image = (cosines * weights).sum(dim=(1, 2))[has_pairs] / counts[has_pairs]
    return -per_image.mean()


def patch_nce(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07, batch_negatives: bool = False) -> torch.Tensor:
    """PatchNCE (CUT eq. 5 / its ``PatchNCELoss``): location s of the query is scored against location s of the
    key (positive) and the other sampled locations of the same image (negatives), cross-entropy with
    temperature ``t`` (0.07 in CUT), averaged over all N x S locations. ``batch_negatives`` adds the other
    images' locations as negatives (CUT's ``nce_includes_all_negatives_from_minibatch``).

    Args:
        query, key: [N, S, C] features of the same S sampled locations (CUT detaches the key; do so outside).
    Returns: a scalar.
    """
    _check(query, key)
    if query.shape != key.shape:
        raise ValueError(f"patch_nce needs the same locations in query and key, got {tuple(query.shape)} / {tuple(key.shape)}")
    n, s, c = query.shape
    q, k = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    if batch_negatives:
        q, k = q.reshape(1, n * s, c), k.reshape(1, n * s, c)
    logits = torch.bmm(q, k.transpose(1, 2)) / temperature                # [B, S', S']: diagonal = positives
    targets = torch.arange(logits.shape[1], device=logits.device).repeat(logits.shape[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[2]), targets)
