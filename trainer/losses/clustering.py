"""Online clustering losses: SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments").

* ``sinkhorn(scores)``: soft codes Q from prototype scores by the Sinkhorn-Knopp algorithm (sec. 3.1, eq. 3),
  the equipartition constraint taken over the whole batch. The function knows nothing of processes: every sum
  and the maximum over samples go through ``reduce_sum`` / ``reduce_max``, which the caller sets to its
  collectives (``trainer.objectives.swav`` passes the all-reduce of ``trainer.distributed``), so 2 processes
  holding halves of a batch get exactly the codes of 1 process holding it all; by default they are the identity.
* ``swav_loss(scores, codes)``: the swapped prediction problem (eq. 1-2) over multi-crop views: the code of
  each assigned crop is predicted from the scores of every other crop.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, reduce_sum: Reduce = _identity,
             reduce_max: Reduce = _identity, total_samples: int | None = None) -> torch.Tensor:
    """Soft assignments of samples to prototypes with equal prototype marginals over the global batch.

    Q = exp(scores / epsilon), then ``iterations`` rounds of: scale each prototype's total mass (summed over
    the samples of all processes) to 1/K, scale each sample's mass to 1/B (B = samples over all processes);
    finally each row is scaled to sum to 1 (SwAV's ``distributed_sinkhorn``). With many iterations each
    prototype receives B/K of the total assignment mass.

    Args:
        scores: [B_local, K] similarities z . c_k of this process's samples to the K prototypes.
        epsilon: entropy regularisation (0.05 in the paper); smaller is closer to a hard assignment.
        iterations: Sinkhorn-Knopp rounds (3 in the paper).
        reduce_sum, reduce_max: the sum / the maximum of a tensor over every holder of a part of the batch
            (e.g. an all-reduce across processes); the identity when this call holds the whole batch.
        total_samples: B, the rows of the whole batch over every part (the caller knows it without a
            collective); None when this call holds the whole batch (B = B_local).
    Returns:
        [B_local, K] float32 codes, each row summing to 1.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores [B, K], got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon} and {iterations}")
    # float64 and the global maximum subtracted: exp() neither overflows nor flushes a whole prototype column
    # to 0 (0 / 0) for small epsilon; the shift cancels in the first normalisation.
    scores = scores.detach().double()
    shift = reduce_max(scores.max())
    q = torch.exp((scores - shift) / epsilon)
    samples = scores.shape[0] if total_samples is None else total_samples  # B, over every part of the batch
    prototypes = scores.shape[1]
    q /= reduce_sum(q.sum())
    for _ in range(iterations):
        q /= reduce_sum(q.sum(dim=0, keepdim=True))  # each prototype: total mass 1 ...
        q /= prototypes  # ... then 1/K
        q /= q.sum(dim=1, keepdim=True)  # each sample: mass 1 ...
        q /= samples  # ... then 1/B
    return (q * samples).float()  # rows sum to 1: an assignment per sample


def swav_loss(scores: torch.Tensor, codes: torch.Tensor, assigned_crops: Sequence[int] = (0, 1),
              temperature: float = 0.1) -> torch.Tensor:
    """Swapped prediction over multi-crop views (SwAV eq. 1-2, as in the authors' ``main_swav.py``).

    For each assigned crop a (codes are computed for the global crops only), the loss averages, over every
    other crop v != a, the cross-entropy -sum_k q_a[k] log softmax(scores_v / temperature)[k] (mean over the
    batch); the result is averaged over the assigned crops.

    Args:
        scores: [V, B, K] prototype scores z_v . c_k of every crop v (gradient flows here).
        codes: [A, B, K] codes q of the assigned crops (targets, no gradient), A = len(assigned_crops).
        assigned_crops: the crop index in ``scores`` that each row of ``codes`` was computed from.
        temperature: tau of the softmax over prototypes (0.1 in the paper).
    Returns:
        Scalar loss.
    """
    if scores.dim() != 3 or codes.dim() != 3 or codes.shape[1:] != scores.shape[1:]:
        raise ValueError(f"swav_loss expects scores [V, B, K] and codes [A, B, K], got {tuple(scores.shape)} "
                         f"and {tuple(codes.shape)}")
    crops = scores.shape[0]
    if len(assigned_crops) != codes.shape[0] or crops < 2 or any(not 0 <= a < crops for a in assigned_crops):
        raise ValueError(f"assigned_crops {list(assigned_crops)} must name {codes.shape[0]} of the {crops} crops (>= 2)")
    log_probs = F.log_softmax(scores.float() / temperature, dim=2)
    codes = codes.detach().float()
    total = scores.new_zeros((), dtype=torch.float32)
    for code, crop in zip(codes, assigned_crops):
        others = [v for v in range(crops) if v != crop]
        cross_entropy = -(code.unsqueeze(0) * log_probs[others]).sum(dim=2).mean(dim=1)  # [V - 1]
        total = total + cross_entropy.mean()
    return total / len(assigned_crops)
