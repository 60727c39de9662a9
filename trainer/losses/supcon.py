"""Supervised contrastive loss (Khosla et al. 2020, "Supervised Contrastive Learning"), the L_out form."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.07,
           base_temperature: float = 0.07) -> torch.Tensor:
    """L^sup_out (eq. 2): for every anchor i of the N*V views, with A(i) all other views and P(i) the views
    in A(i) sharing i's label,

        l_i = -(t / t_base) * 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

    and the loss is the mean of l_i over anchors with |P(i)| > 0; anchors with no positive (a single view of
    a sample whose label nobody else has) are left out instead of dividing by zero. No such anchor at all
    gives 0. t / t_base is the authors' code's rescaling (1 when t_base = t).

    Args:
        features: [N, V, D], V views of N samples; L2-normalised here.
        labels: [N] int; None -> each sample is its own class (the SimCLR loss: for V = 2 this is
            ``nt_xent`` times t / t_base). A negative label means "unknown": that sample's positives are
            only its own other views.
        temperature: t; base_temperature: t_base.
    Returns:
        Scalar loss.
    """
    if features.dim() != 3:
        raise ValueError(f"supcon expects features [N, V, D], got {tuple(features.shape)}")
    n, v, _ = features.shape
    device = features.device
    sample = torch.arange(n, device=device)
    if labels is None:
        labels = sample
    else:
        labels = labels.to(device).view(-1)
        if labels.shape[0] != n:
            raise ValueError(f"supcon: {labels.shape[0]} labels for {n} samples")
        # Unknown labels (< 0) become classes of their own: shifted below every known label and unique.
        labels = torch.where(labels < 0, -1 - sample, labels)
    # View-major rows (view 0 of every sample, then view 1, ...) as in the authors' code.
    z = F.normalize(features.transpose(0, 1).reshape(n * v, -1), dim=1)
    row_labels = labels.repeat(v)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(n * v, dtype=torch.bool, device=device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # A(i) excludes the anchor itself
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (row_labels.unsqueeze(0) == row_labels.unsqueeze(1)) & ~self_mask
    counts = positives.sum(dim=1)
    # where(), not multiplication: log_prob is -inf on the diagonal and 0 * -inf would be NaN.
    mean_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / counts.clamp_min(1)
    has_positive = counts > 0
    if not bool(has_positive.any()):
        return features.sum() * 0.0
    return -(temperature / base_temperature) * mean_log_prob[has_positive].mean()
