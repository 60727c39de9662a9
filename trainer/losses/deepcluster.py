"""DeepCluster-v2's loss (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", sec. 3 / appendix: DeepCluster-v2; the authors' ``main_deepclusterv2.py``).

Each training sample carries one hard cluster assignment per prototype set (k-means over a memory of embeddings,
redone every epoch); every crop of the sample predicts that assignment from its prototype scores with a softmax
at temperature tau. Pure function of tensors; the objective gathers scores across processes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def deepcluster_v2_loss(scores: Sequence[torch.Tensor], assignments: torch.Tensor,
                        temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy between each crop's prototype scores and its sample's cluster assignment, averaged over the
    crops and the samples that have an assignment, then over the prototype sets.

    For set h: L_h = mean over crops v and assigned samples b of -log softmax(scores[h][v, b] / tau)[a_hb].
    The result is (1/H) sum_h L_h (the reference divides the summed cross-entropies by the number of sets).

    Args:
        scores: H tensors [V, B, K_h]: z_vb . c_hk, the normalised embedding of crop v of sample b against the
            K_h prototypes of set h (gradient flows here).
        assignments: [H, B] int64 cluster index of each sample in each set; a negative value (a sample the last
            clustering did not see) leaves it out of that set's mean, as the reference's ignore_index.
        temperature: tau (0.1 in the paper).
    Returns:
        Scalar loss; a set whose samples are all unassigned contributes 0.
    """
    if assignments.dim() != 2 or assignments.shape[0] != len(scores) or not len(scores):
        raise ValueError(f"deepcluster_v2_loss expects assignments [H, B] for H = {len(scores)} prototype sets, got "
                         f"{tuple(assignments.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    total = scores[0].new_zeros((), dtype=torch.float32)
    for head_scores, targets in zip(scores, assignments):
        if head_scores.dim() != 3 or head_scores.shape[1] != targets.shape[0]:
            raise ValueError(f"deepcluster_v2_loss expects scores [V, B={targets.shape[0]}, K], got "
                             f"{tuple(head_scores.shape)}")
        crops = head_scores.shape[0]
        log_probs = F.log_softmax(head_scores.float() / temperature, dim=2)
        valid = targets >= 0
        index = targets.clamp_min(0).view(1, -1, 1).expand(crops, -1, 1)
        nll = -log_probs.gather(2, index).squeeze(2)  # [V, B]
        total = total + (nll * valid).sum() / (crops * valid.sum()).clamp_min(1)
    return total / len(scores)
