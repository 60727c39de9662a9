"""SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

CLIP's two towers (any registered backbone + linear projection, or an open_clip visual tower; open_clip's causal
text transformer) trained with the pairwise sigmoid loss instead of the softmax: every image-text pair of the
global batch is a binary classification, matching or not (``trainer.losses.siglip``). The logit is
``t <x, y> + b`` with a learnable t = exp(t') and b, initialised as in the paper to t' = log 10 and b = -10 (the
bias keeps the many negatives from dominating the first steps).

Negatives across processes: no softmax normalises over the batch, so the global loss is a sum of blocks and
nothing is gathered. As in the paper's chunked implementation (sec. 3.3) and open_clip's SigLipLoss, each
process scores its images against its own texts (positives on the diagonal), then receives the other processes'
text blocks one at a time from its ring neighbours (``trainer.distributed.ring_exchange_with_grad``; gradients
flow back to the sender) and adds each block's all-negative loss. The logged loss is the mean of the processes'
shares, the loss of the whole batch on one process; gradients are those of one process holding the whole batch.

Choices: the logit scale is not clamped by default (the paper does not; ``max_logit_scale`` clamps it like
CLIP's 100 when set). The saved model card carries the learned ``logit_scale`` (the multiplier t) and
``logit_bias`` (b), which zero-shot scoring and the open_clip export need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.distributed import mean_over_processes, ring_exchange_with_grad
from trainer.losses import siglip_loss, siglip_negatives_loss

from .base import Objective, ObjectiveSpec, register
from .clip import CLIP
from .options import as_number, check_crop_scale, require_at_least, require_positive


def check_logit_init(options) -> None:
    """``init_logit_scale`` > 0 (the multiplier t), ``init_logit_bias`` a number, ``max_logit_scale`` None or
    >= ``init_logit_scale``."""
    require_positive(options, "init_logit_scale")
    as_number(options, "init_logit_bias")
    if options.max_logit_scale is not None and as_number(options, "max_logit_scale") < options.init_logit_scale:
        raise ValueError(f"max_logit_scale ({options.max_logit_scale}) must be >= init_logit_scale "
                         f"({options.init_logit_scale})")


@dataclass
class SigLIPOptions:
    # Width of the joint image-text space (image projection and text tower output); an open_clip visual tower
    # projects itself, as in CLIP.
    projection_dim: int = 256
    init_logit_scale: float = 10.0  # t = exp(t'), t' = log 10 (paper)
    init_logit_bias: float = -10.0  # b (paper)
    max_logit_scale: float | None = None  # None: unclamped (paper); CLIP clamps at 100
    crop_scale: tuple[float, float] = (0.8, 1.0)
    text: dict = field(default_factory=dict)  # TextConfig fields

    def __post_init__(self) -> None:
        require_at_least(self, 1, "projection_dim")
        check_logit_init(self)
        self.crop_scale = check_crop_scale(self.crop_scale)


class SigmoidLogits(nn.Module):
    """The learnable t' (t = exp(t'), optionally clamped) and b of the sigmoid loss, shared with LiT (whose softmax
    loss has no bias: ``init_bias=None``)."""

    def __init__(self, init_scale: float, init_bias: float | None, max_scale: float | None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias))) if init_bias is not None else None
        self.max_scale = max_scale

    def scale(self) -> torch.Tensor:
        scale = self.logit_scale.exp()
        return scale if self.max_scale is None else scale.clamp(max=self.max_scale)

    def card(self) -> dict:
        """The model card's ``logit_scale`` (the multiplier t as training used it) and ``logit_bias`` (b)."""
        card = {"logit_scale": float(self.scale().detach())}
        if self.logit_bias is not None:
            card["logit_bias"] = float(self.logit_bias.detach())
        return card


def sigmoid_loss_over_processes(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                                logit_bias: torch.Tensor) -> torch.Tensor:
    """The sigmoid loss of the global batch from this process's image and text embeddings [n, D] (normalised
    here), other processes' texts arriving block by block round the ring; the value is the whole batch's loss
    on every process and its gradient, after the processes' gradients are averaged, that of one process holding
    the whole batch. Every process must call it (equal n)."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    loss = siglip_loss(image, text, logit_scale, logit_bias)
    for other in ring_exchange_with_grad(text):
        loss = loss + siglip_negatives_loss(image, other, logit_scale, logit_bias)
    # Each process's share is its images' rows divided by its n images; their mean over processes is the sum over
    # all pairs divided by all images. Averaging with gradient keeps each share's gradient at 1 on its process.
    return mean_over_processes(loss)


@register
class SigLIP(Objective):
    key = "siglip"
    Options = SigLIPOptions
    requires_text = True  # trains on captions: shards without text are refused (BuildViews)

    def __init__(self, spec: ObjectiveSpec, options: SigLIPOptions):
        super().__init__(spec, options)
        self.logits = SigmoidLogits(options.init_logit_scale, options.init_logit_bias, options.max_logit_scale)

    # CLIP's towers, image-text views and per-process embeddings; SigLIP changes only the loss.
    model_config = CLIP.model_config
    views = CLIP.views
    embed = CLIP.embed

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        scale = self.logits.scale()
        loss = sigmoid_loss_over_processes(embeddings["image"], embeddings["text"], scale, self.logits.logit_bias)
        return {"loss": loss, "logit_scale": scale.detach(), "logit_bias": self.logits.logit_bias.detach()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(batch), batch)

    def model_card_extras(self) -> dict:
        return self.logits.card()
