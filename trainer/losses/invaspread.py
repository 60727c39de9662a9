"""InvaSpread's softmax-embedding loss (Ye et al. 2019, "Unsupervised Embedding Learning via Invariant and
Spreading Instance Feature", CVPR), a pure function of the batch's features."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def invariance_spreading_loss(features: torch.Tensor, augmented: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The two-term instance-wise softmax embedding loss (paper eqs. 2-5; seed note 003), mean over instances.

    With ``f_i`` the feature of original image ``x_i`` and ``f̂_i`` that of its augmented copy ``x̂_i``
    (both L2-normalised here), over a batch of ``N`` instances::

        P(i | x̂_i) = exp(f_i·f̂_i / τ) / Σ_k exp(f_k·f̂_i / τ)          (the augmented copy is recognised as i)
        P(i | x_j) = exp(f_i·f_j / τ) / Σ_k exp(f_k·f_j / τ),  j ≠ i    (original x_j is recognised as i)
        L = -(1/N) [ Σ_i log P(i | x̂_i) + Σ_i Σ_{j≠i} log(1 - P(i | x_j)) ]

    Both sums over ``k`` run over the batch's originals (k = 1..N). The first term makes features invariant to
    augmentation, the second spreads different instances apart. Because the denominator of ``P(i | x_j)``
    contains ``exp(f_j·f_j / τ) = exp(1/τ)``, the largest possible term, ``P(i | x_j) ≤ 1/2`` and
    ``log(1 - P)`` is always finite. The paper sums over instances; dividing by ``N`` (as the authors' code
    does) keeps the loss scale independent of the batch size.

    Args:
        features: [N, D] features of the originals.
        augmented: [N, D] features of the augmented copies; row i is the copy of original i.
        temperature: τ (0.1 in the paper).
    Returns:
        Scalar loss; gradients flow into both inputs (one shared encoder, no stop-gradient).
    """
    if features.shape != augmented.shape or features.dim() != 2:
        raise ValueError(
            f"invariance_spreading_loss expects two [N, D] tensors of one shape, got {tuple(features.shape)} and {tuple(augmented.shape)}"
        )
    f = F.normalize(features, dim=1)
    f_hat = F.normalize(augmented, dim=1)
    n = f.shape[0]
    # Row i: f̂_i against every original f_k; the softmax over k gives P(k | x̂_i), its diagonal P(i | x̂_i).
    invariance = torch.log_softmax(f_hat @ f.t() / temperature, dim=1).diagonal().sum()
    # Row j: f_j against every original f_k; entry [j, i] is P(i | x_j). Keep only i ≠ j.
    p_original = torch.softmax(f @ f.t() / temperature, dim=1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=f.device)
    spreading = torch.log1p(-p_original[off_diagonal]).sum()
    return -(invariance + spreading) / n
