"""CURL (Srinivas, Laskin & Abbeel 2020, "CURL: Contrastive Unsupervised Representations for Reinforcement
Learning"), its contrastive part applied to image datasets.

Two random crops of each image (CURL's only augmentation: the observation is rendered larger than the encoder's
input and cropped; here the image is edge-padded by ``pad`` pixels and cropped back, 32 -> 40 -> 32 ≈ CURL's
100 -> 84) give an anchor and a positive. The anchor goes through the query encoder (backbone, then CURL's
head: linear -> LayerNorm -> tanh to a 50-d code), the positive through a momentum key encoder, an EMA of the
query encoder and head (θ_k <- m θ_k + (1 - m) θ_q after each step, m = 0.95: CURL's encoder τ = 0.05) without
gradient. Scores are bilinear, ``logits = q W kᵀ`` over the batch with a learnable W (initialised uniform in
[0, 1) as in the authors' code), each row shifted by its max, and cross-entropy takes the diagonal as the
positives. Queries are gathered with gradient and keys without, so every process scores the global batch.
Only the query backbone is exported; head, W and the key encoder are training-only.

``loss`` may switch to another InfoNCE-family loss on the same scores (diagonal positive, off-diagonal
negatives; ``temperature`` divides the scores, 1 = CURL). Those get the unshifted scores, since binary NCE and
the debiased clamp are not shift-invariant; they were written for cosines, so on unbounded bilinear scores
they are options to experiment with, not the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torchvision import transforms as T

from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.nce_family import contrastive_loss_from_similarities
from trainer.models import linear_layernorm_tanh

from .base import Objective, ObjectiveSpec, register
from .momentum import ema_update_, momentum_copy
from .options import InfoNCEOptions


@dataclass
class CURLOptions(InfoNCEOptions):
    projection_dim: int = 50       # CURL's encoder feature size (z_dim)
    key_momentum: float = 0.95     # m of the key encoder's EMA (CURL: encoder_tau = 0.05)
    pad: int = 4                   # crop from the image edge-padded by this many pixels per side
    flip: float = 0.0              # CURL uses crops only; a horizontal flip probability can be added
    temperature: float = 1.0       # scores are divided by this; CURL's bilinear logits are unscaled

    ALIASES: ClassVar[dict[str, str]] = {"feature_dim": "projection_dim"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.key_momentum <= 1.0:
            raise ValueError(f"key_momentum must be in [0, 1], got {self.key_momentum}")


class RandomCropPair:
    """Two independent random crops ``view0`` (anchor) / ``view1`` (positive) of the edge-padded image."""

    def __init__(self, size: int, mean, std, pad: int, flip: float = 0.0):
        steps: list = [T.Resize(size, antialias=True), T.CenterCrop(size),
                       T.RandomCrop(size, padding=pad, padding_mode="edge")]
        if flip > 0:
            steps.append(T.RandomHorizontalFlip(flip))
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image, sample) -> dict:
        return {"view0": self.transform(image), "view1": self.transform(image)}


@register
class CURL(Objective):
    key = "curl"
    Options = CURLOptions

    def __init__(self, spec: ObjectiveSpec, options: CURLOptions):
        super().__init__(spec, options)
        self.head = linear_layernorm_tanh(self.encoder.embed_dim, options.projection_dim)  # CURL's encoder output
        self.W = nn.Parameter(torch.rand(options.projection_dim, options.projection_dim))
        self.key_encoder = momentum_copy(self.encoder)
        self.key_head = momentum_copy(self.head)

    def views(self) -> RandomCropPair:
        config = self.encoder.config
        return RandomCropPair(config.image_size, config.mean, config.std, self.options.pad, self.options.flip)

    def bilinear_logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[N, F] queries, [M, F] keys -> [N, M] bilinear scores q W kᵀ."""
        return queries @ self.W @ keys.t()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        queries = self.head(self.encoder.encode_image(batch["view0"]))
        with torch.no_grad():
            keys = self.key_head(self.key_encoder.encode_image(batch["view1"]))
        logits = self.bilinear_logits(gather_with_grad(queries), gather_no_grad(keys))
        n = logits.shape[0]
        kind = self.options.loss
        if kind == "infonce":
            # CURL subtracts each row's max: the cross-entropy is unchanged, the exponentials cannot overflow.
            logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        positive = logits.diagonal()
        negatives = logits[~torch.eye(n, dtype=torch.bool, device=logits.device)].view(n, n - 1)
        loss = contrastive_loss_from_similarities(kind, positive, negatives, self.options.temperature,
                                                  **self.options.loss_options())
        accuracy = (logits.argmax(dim=1) == torch.arange(n, device=logits.device)).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA of the query encoder and head into the key encoder and head."""
        ema_update_(self.key_encoder, self.encoder, self.options.key_momentum)
        ema_update_(self.key_head, self.head, self.options.key_momentum)
