"""Memory-bank pieces of non-parametric instance discrimination (Wu et al. 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination", CVPR): the estimate of NCE's normalising constant Z, the bank's
momentum update and the proximal regulariser. Pure functions of tensors. The NCE loss itself is the ``nce`` kind
of ``trainer.losses.nce_family`` (with ``noise_probability=1/n`` and the fixed ``normaliser=Z``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def estimate_normaliser(scores: torch.Tensor, num_data: int, temperature: float) -> torch.Tensor:
    """Monte-Carlo estimate of the partition function Z (paper eq. 7), from one batch's bank scores.

    ``Z ≈ n · E_j[exp(v_j·f_i / τ)] ≈ (n / m) Σ_k exp(v_{j_k}·f_i / τ)``, averaged over the batch's queries too
    (the paper estimates Z once, from the first batches, and keeps it fixed: features and bank entries are
    unit vectors, so Z varies little).

    Args:
        scores: [N, K] cosine similarities v_j·f_i of the batch's features with bank entries drawn uniformly.
        num_data: n, the number of instances (bank rows).
        temperature: τ.
    Returns:
        0-dim tensor Z (detached: it is a constant of the loss, not a parameter).
    """
    return (scores.detach() / temperature).exp().mean() * num_data


def proximal_penalty(features: torch.Tensor, previous: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The proximal regulariser ``‖v_i^{(t)} - v_i^{(t-1)}‖²`` (paper §3.4), mean over the batch.

    Args:
        features: [N, D] current features v_i^{(t)} (with gradient).
        previous: [N, D] the bank's entries v_i^{(t-1)} for the same instances (constants).
        mask: optional [N] bool, which rows have a previous feature at all (an instance never seen before has only
            the bank's random initialisation, which is not a v^{(t-1)}); masked rows contribute 0 but still count
            in the mean, so the term's scale does not depend on how many rows are masked.
    Returns:
        Scalar (multiply by λ).
    """
    squared = (features - previous.detach()).pow(2).sum(dim=1)
    if mask is not None:
        squared = squared * mask.to(squared.dtype)
    return squared.mean()


@torch.no_grad()
def momentum_update(entries: torch.Tensor, features: torch.Tensor, momentum: float = 0.5) -> torch.Tensor:
    """The bank's update ``v_i <- normalize(η v_i + (1 - η) f_i)`` (η = 0.5 in the paper), for gathered rows.

    Args:
        entries: [N, D] current bank rows v_i.
        features: [N, D] this step's features f_i of the same instances (L2-normalised).
    Returns:
        [N, D] new unit-norm rows.
    """
    return F.normalize(momentum * entries + (1.0 - momentum) * features, dim=1)
