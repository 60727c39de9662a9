"""CO2 (Wei, Wang, Shen & Yuille 2021, "CO2: Consistent Contrast for Unsupervised Visual Representation
Learning").

MoCo v2 (``trainer.objectives.moco2``: momentum key encoder, queue, shuffling BN, MLP head, InfoNCE over the
queue) plus the paper's consistency regulariser: instance discrimination treats every queue entry as equally
negative, so CO2 takes the positive key's similarity distribution over [query, queue] as a soft pseudo label
for the query's over [key, queue] and adds alpha times their symmetric KL (temperature tau_con;
``trainer.losses.co2``). The queue holds the negatives of both terms.

Implementation choices: alpha 1 and tau_con 0.05 by default (lightly's CO2Regularizer); the query (gathered
with gradient) carries the regulariser's gradient, the keys and queue none (they come from the key encoder).
Both terms are logged (``contrastive_loss``, ``consistency_loss``) beside MoCo's top-1 ``accuracy``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.losses.co2 import co2_consistency

from .base import register
from .moco2 import MoCo2, MoCo2Options
from .options import require_non_negative, require_positive


@dataclass
class CO2Options(MoCo2Options):
    consistency_weight: float = 1.0        # alpha, the regulariser's weight (lightly 1.0)
    consistency_temperature: float = 0.05  # tau_con of the two similarity distributions (lightly 0.05)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_non_negative(self, "consistency_weight")
        require_positive(self, "consistency_temperature")


@register
class CO2(MoCo2):
    key = "co2"
    Options = CO2Options

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        query, key = self.queries_and_keys(batch)
        outputs = self.contrast(query, key)  # MoCo's InfoNCE over the queue (its keys enqueued after the step)
        consistency = co2_consistency(query, key, self.queue.detach(), self.options.consistency_temperature)
        return {**outputs, "loss": outputs["loss"] + self.options.consistency_weight * consistency,
                "contrastive_loss": outputs["loss"], "consistency_loss": consistency}
