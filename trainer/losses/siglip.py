"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1).

Every image-text pair of the batch is its own binary classification: a matching pair (label z = +1) or not
(z = -1), with logit ``t * <x, y> + b`` for a learnable inverse temperature t (the multiplier, exp of the
parameter t') and bias b. The loss is ``-sum_ij log sigmoid(z_ij * (t <x_i, y_j> + b))`` over the pairs,
divided by the number of images |B|, as the paper's pseudo-code and open_clip's SigLipLoss do.

No softmax couples the rows, so the global batch splits into blocks: ``siglip_loss`` is the block of this
process's images against its own texts (positives on the diagonal), ``siglip_negatives_loss`` the block of its
images against another process's texts (all pairs negative). Summing the blocks of one process's images against
every process's texts gives that process's share; the shares average to the loss of the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
            logit_bias: torch.Tensor | float) -> torch.Tensor:
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"siglip: image and text embeddings must be [n, D] and [m, D] of one width D, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    return logit_scale * image @ text.t() + logit_bias


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> torch.Tensor:
    """The sigmoid loss of a block of matching pairs: row i of ``image`` and of ``text`` belong together.

    Args:
        image, text: [n, D] L2-normalised embeddings (not normalised here: the caller normalises once and may
            pass the texts on to other processes).
        logit_scale: the multiplier t = exp(t') (scalar tensor or float).
        logit_bias: the bias b.
    Returns:
        ``-sum_ij log sigmoid(z_ij (t <image_i, text_j> + b)) / n``, z = +1 on the diagonal, -1 elsewhere.
    """
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"siglip: {image.shape[0]} images but {text.shape[0]} texts; matching pairs need one each")
    logits = _logits(image, text, logit_scale, logit_bias)
    labels = 2 * torch.eye(image.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def siglip_negatives_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                          logit_bias: torch.Tensor | float) -> torch.Tensor:
    """The sigmoid loss of a block where no pair matches: images [n, D] against texts [m, D] of other samples
    (another process's batch), both L2-normalised. Returns ``-sum_ij log sigmoid(-(t <image_i, text_j> + b)) / n``
    (divided by the n images of this block's rows, so it adds to ``siglip_loss`` of the same images)."""
    return -F.logsigmoid(-_logits(image, text, logit_scale, logit_bias)).sum() / image.shape[0]
