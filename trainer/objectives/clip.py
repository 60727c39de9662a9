"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

An image tower (any registered backbone + linear projection, or an open_clip visual tower) and a causal
text transformer over open_clip's BPE tokens, trained with the symmetric cross-entropy over the global
batch. Features are gathered across processes with gradient; the learnable logit scale starts at 1/0.07
and is clamped at 100, as in the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from trainer.data.views import ImageText
from trainer.distributed import gather_with_grad
from trainer.losses import clip_loss
from trainer.models import ModelConfig, TextConfig

from .base import Objective, ObjectiveSpec, default_model_config, register


@dataclass
class CLIPOptions:
    # Width of the joint image-text space: the image projection's and the text tower's output. Ignored with an
    # open_clip backbone, whose visual tower projects itself (the model's embed_dim is then the tower's).
    projection_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    crop_scale: tuple[float, float] = (0.8, 1.0)
    text: dict = field(default_factory=dict)  # TextConfig fields

    ALIASES: ClassVar[dict[str, str]] = {"embed_dim": "projection_dim"}


@register
class CLIP(Objective):
    key = "clip"
    Options = CLIPOptions
    requires_text = True  # trains on captions: shards without text are refused (BuildViews)

    def __init__(self, spec: ObjectiveSpec, options: CLIPOptions):
        super().__init__(spec, options)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / options.init_temperature)))

    def model_config(self, spec: ObjectiveSpec, options: CLIPOptions) -> ModelConfig:
        """Image tower + linear projection (open_clip visual towers project themselves) and the text tower."""
        projection = None if spec.backbone.startswith("open_clip:") else options.projection_dim
        return default_model_config(spec, image_projection=projection, text=TextConfig(**options.text))

    def views(self) -> ImageText:
        config = self.encoder.config
        return ImageText(config.image_size, config.mean, config.std, config.text.context_length, self.options.crop_scale)

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """This process's image and text embeddings [n, embed_dim] (the split ``trainer.grad_cache`` uses)."""
        return {"image": self.encoder.encode_image(batch["image"]), "text": self.encoder.encode_text(batch["tokens"])}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        scale = self.logit_scale.exp().clamp(max=self.options.max_logit_scale)
        loss = clip_loss(gather_with_grad(embeddings["image"]), gather_with_grad(embeddings["text"]), scale)
        return {"loss": loss, "logit_scale": scale.detach()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(batch), batch)

    def model_card_extras(self) -> dict:
        """The learned logit scale (the multiplier, as clamped in training): zero-shot scoring and open_clip need it."""
        return {"logit_scale": float(self.logit_scale.detach().exp().clamp(max=self.options.max_logit_scale))}
