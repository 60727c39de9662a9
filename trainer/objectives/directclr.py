"""DirectCLR (Jing, Vincent, LeCun & Tian 2022, "Understanding Dimensional Collapse in Contrastive
Self-supervised Learning").

The paper shows that a projector lets the representation collapse in dimension while the projected embedding
does not, and that what a (linear) projector does is equivalent to training only a subspace of the
representation with the contrastive loss. DirectCLR therefore drops the projector and applies InfoNCE directly
to the first d0 dimensions of the backbone representation (d0 = 360 of ResNet-50's 2048); the rest of the
vector gets its gradient only through the shared backbone, and the whole representation is what is exported
and evaluated.

Implementation choices: the loss is the authors' code's: symmetric InfoNCE with tau 0.1 in which each
anchor's negatives are the other images' views of the other augmentation (in-batch, N - 1 per anchor), over
the global batch (sub-vectors gathered from all processes with gradient); the ``loss`` option swaps in another
InfoNCE-family loss over the same pairs. ``sub_dim`` unset takes the paper's share of the backbone width
(360 / 2048: 90 of resnet18-cifar's 512, 45 of cnn-small's 256). Views: the authors' (Barlow Twins')
asymmetric recipe, blur 1.0 / 0.1 and solarize 0 / 0.2, in ``augment`` and ``second_view_augment``.
``embedding_std`` is logged for the trained sub-vector and ``representation_std`` for the whole vector (the
paper's point: both stay spread out).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.views import view_configs
from trainer.distributed import gather_with_grad
from trainer.losses import contrastive_loss

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import InfoNCEOptions

PAPER_SUB_DIM_SHARE = 360 / 2048  # d0 of ResNet-50's 2048-d representation in the paper

# The authors' augmentation (Barlow Twins'): crop 0.08-1, flip, jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 (here the
# SimCLR factors at strength 0.5), grayscale 0.2, blur 1.0 / 0.1 and solarize 0.0 / 0.2 on the two views.
PAPER_AUGMENT = {"crop_scale": (0.08, 1.0), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                 "blur_prob": 1.0, "solarize_prob": 0.0}
PAPER_SECOND_VIEW = {"blur_prob": 0.1, "solarize_prob": 0.2}


@dataclass
class DirectCLROptions(InfoNCEOptions):
    temperature: float = 0.1     # tau (the authors' code)
    sub_dim: int | None = None   # d0, the leading dimensions the loss sees; None: 360/2048 of the backbone width
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0's AugmentConfig fields
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sub_dim is not None and (isinstance(self.sub_dim, bool) or not isinstance(self.sub_dim, int)
                                         or self.sub_dim < 1):
            raise ValueError(f"sub_dim must be a positive integer (or unset), got {self.sub_dim!r}")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


@register
class DirectCLR(Objective):
    key = "directclr"
    Options = DirectCLROptions

    def __init__(self, spec: ObjectiveSpec, options: DirectCLROptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe; no projector (the paper's point)
        width = self.encoder.embed_dim
        if options.sub_dim is not None and options.sub_dim > width:
            raise ValueError(f"{self.key}: sub_dim={options.sub_dim} exceeds the {width}-d representation of "
                             f"backbone {spec.backbone!r}")
        self.sub_dim = options.sub_dim or max(1, round(width * PAPER_SUB_DIM_SHARE))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        r1 = self.encoder.encode_image(batch["view0"])
        r2 = self.encoder.encode_image(batch["view1"])
        z1 = gather_with_grad(r1[:, : self.sub_dim])
        z2 = gather_with_grad(r2[:, : self.sub_dim])
        kind, temperature, extra = self.options.loss, self.options.temperature, self.options.loss_options()
        loss = 0.5 * (contrastive_loss(kind, z1, z2, None, temperature, **extra)
                      + contrastive_loss(kind, z2, z1, None, temperature, **extra))
        return {"loss": loss, "embedding_std": embedding_std(z1), "representation_std": embedding_std(r1)}
