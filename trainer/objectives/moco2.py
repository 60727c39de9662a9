"""MoCo v2 (Chen, Fan, Girshick & He 2020, "Improved Baselines with Momentum Contrastive Learning").

MoCo v1 (``trainer.objectives.moco``: momentum key encoder, FIFO queue, shuffling BN) with v2's changes:
the fc layer becomes a 2-layer MLP head (2048-d hidden, ReLU, 128-d out; no batch norm, as in the paper;
dropped at export), Gaussian blur joins the augmentation (SimCLR's family: jitter 0.8 probability,
20% grayscale, blur with probability 0.5), tau = 0.2, and a cosine learning-rate schedule (the training loop's
warm-up + cosine). At 32 px the CIFAR recipe turns blur off: see ``trainer/recipes/moco2.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from trainer.models import mlp_head

from .base import register
from .moco import MoCo, MoCoOptions


@dataclass
class MoCo2Options(MoCoOptions):
    temperature: float = 0.2
    projection_hidden_dim: int = 2048  # the MLP head's hidden width
    # SimCLR's augmentation as adopted by v2 (jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale 0.2, blur p = 0.5).
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5,
                                                   "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.5})


@register
class MoCo2(MoCo):
    key = "moco2"
    Options = MoCo2Options

    def build_head(self, in_dim: int) -> nn.Module:
        """v2: Linear - ReLU - Linear in place of the fc layer."""
        return mlp_head(in_dim, self.options.projection_hidden_dim, self.options.projection_dim)
