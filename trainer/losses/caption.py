"""Captioning loss of CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

The multimodal decoder predicts each caption token from the image and the tokens before it (teacher forcing);
the loss is the next-token cross-entropy averaged over the caption tokens, padding excluded (the paper's
L_Cap = -sum_t log P(y_t | y_<t, x), per token as open_clip's ``CoCaLoss``). Split in two so several
processes (or gradient-cache micro-batches) can add their sums and token counts before dividing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_token_nll(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption summed negative log-likelihood of the target tokens and the number of tokens summed.

    Args:
        logits: [N, T, V] float, the decoder's scores for the token at each position (position t predicts
            ``targets[:, t]``, i.e. the caption shifted by one).
        targets: [N, T] int64 token ids; positions equal to ``pad_id`` are ignored.
        pad_id: the padding token id (0 for open_clip's tokenizer).
    Returns:
        (nll [N] float: sum over the non-pad positions of -log softmax(logits)[target],
         count [N] int64: the non-pad positions of each caption).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [N, T]")
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=pad_id, reduction="none")
    keep = targets != pad_id
    return (per_token * keep).sum(dim=1), keep.sum(dim=1)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-pad target tokens of the batch (scalar; 0 when all are pad).

    Shapes as in ``caption_token_nll``: logits [N, T, V], targets [N, T]."""
    nll, count = caption_token_nll(logits, targets, pad_id)
    return nll.sum() / count.sum().clamp(min=1)
