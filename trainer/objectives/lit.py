"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning").

A pretrained image tower, locked, and a text tower taught to read out of it: only the text tower (and the
loss's temperature, and bias) learns, with CLIP's contrastive softmax loss (the paper's) or SigLIP's sigmoid
loss (``loss: clip|siglip``; SigLIP's paper also trains LiT this way). The image tower comes from
``--init-from`` (``spec.init_from``, loaded by the base ``Objective`` before this module continues): a manyview
``RUN/model`` or checkpoint, or a local timm / torchvision / open_clip weights file for the run's backbone.
Without it the objective refuses to start: a locked random tower teaches the text tower nothing useful.

Locked means: no gradients (its parameters have ``requires_grad=False``, so ``parameter_groups`` leaves them
out of the optimizer, and the image is encoded under ``torch.no_grad``), and batch norm statistics frozen (the
image tower stays in eval mode when the objective is put in train mode), so the tower after training is
bit-for-bit the tower that was loaded.

Head choice (the paper's best setting, "Lu": the whole image tower locked, including its head; big_vision's LiT
configs read the pre-logits features with no new image head): no learnable projection is added on the image
side; the text tower's output width is the image tower's embedding width, so the text maps straight into the
image feature space. A library file's classifier is dropped by the loader, so the image embedding is the
backbone's pooled (pre-logits) feature. A manyview ``RUN/model`` keeps its whole image side: the image head /
projection (and colour split, patch grid, normalisation) saved in its ``config.json`` are rebuilt here, loaded
and locked too. A checkpoint directory carries no model config, so it is read as the plain backbone (one whose
model had a head or projection is refused by the strict loader with the keys listed; pass its ``RUN/model``).

Choices: the logit scale starts at 10 for both losses (big_vision's LiT ``temperature_init``), the SigLIP bias at
-10 (SigLIP's paper), neither clamped unless ``max_logit_scale`` is set. A ``RUN/model`` that has a text tower of
the same shape (a CLIP model) also initialises the text tower, which then keeps learning (the paper's pretrained
text towers). The saved model card carries ``logit_scale`` (and ``logit_bias`` with the SigLIP loss).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from trainer.distributed import gather_with_grad
from trainer.losses import clip_loss
from trainer.models import ModelConfig, TextConfig

from .base import Objective, ObjectiveSpec, default_model_config, register
from .clip import CLIP
from .options import check_crop_scale
from .siglip import SigmoidLogits, check_logit_init, sigmoid_loss_over_processes

LOSSES = ("clip", "siglip")
# The image side of a saved manyview model: what must be rebuilt for its weights to load, all of it locked.
IMAGE_FIELDS = ("channels", "image_head", "image_projection", "colour_space", "view_channels", "patch_grid",
                "backbone_norm", "register_tokens", "vit_pool")


@dataclass
class LiTOptions:
    loss: str = "clip"  # clip: the paper's contrastive softmax; siglip: the pairwise sigmoid loss
    init_logit_scale: float = 10.0  # the multiplier t (big_vision's LiT temperature_init)
    init_logit_bias: float = -10.0  # the sigmoid loss's b (SigLIP); unused with the clip loss
    max_logit_scale: float | None = None  # None: unclamped
    crop_scale: tuple[float, float] = (0.8, 1.0)
    text: dict = field(default_factory=dict)  # TextConfig fields; the output width is the image embedding's

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        check_logit_init(self)
        self.crop_scale = check_crop_scale(self.crop_scale)


def saved_image_config(path: str) -> dict:
    """The image-side ``ModelConfig`` fields (and normalisation) of a manyview ``RUN/model`` at ``path``; an empty
    mapping for anything else (checkpoints, library weights files), which the backbone alone describes."""
    config_path = os.path.join(os.path.expanduser(path), "config.json")
    if not (os.path.isdir(os.path.expanduser(path)) and os.path.isfile(config_path)):
        return {}
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle).get("model") or {}
    return {name: saved[name] for name in (*IMAGE_FIELDS, "mean", "std") if saved.get(name) is not None}


@register
class LiT(Objective):
    key = "lit"
    Options = LiTOptions
    requires_text = True  # trains on captions: shards without text are refused (BuildViews)
    requires_init_from: ClassVar[bool] = True  # tests and tools that build every objective pass --init-from for it

    def __init__(self, spec: ObjectiveSpec, options: LiTOptions):
        if not spec.init_from:
            raise ValueError("lit: LiT locks a pretrained image tower, so it needs --init-from PATH (a manyview "
                             "RUN/model or checkpoint, or a local timm / torchvision / open_clip weights file for "
                             f"the {spec.backbone} backbone)")
        super().__init__(spec, options)  # builds self.encoder and loads spec.init_from into it
        for module in self.image_tower():
            module.requires_grad_(False)
        self.train(self.training)  # the image tower to eval mode
        bias = options.init_logit_bias if options.loss == "siglip" else None  # no unused parameter under DDP
        self.logits = SigmoidLogits(options.init_logit_scale, bias, options.max_logit_scale)

    def model_config(self, spec: ObjectiveSpec, options: LiTOptions) -> ModelConfig:
        """The loaded image tower as saved (a manyview model's head included) and a text tower whose output width
        is that tower's embedding width (``EmbeddingModel`` sizes the text tower to ``embed_dim``)."""
        image = saved_image_config(spec.init_from)
        normalisation = {name: image.pop(name) for name in ("mean", "std") if name in image}
        config = default_model_config(spec, text=TextConfig(**options.text), **image)
        if spec.mean is None and spec.std is None:  # the tower's own normalisation unless the user set one
            for name, value in normalisation.items():
                setattr(config, name, list(value))
        return config

    def image_tower(self) -> list[nn.Module]:
        """The locked modules: the backbone and any head / projection on the image side."""
        encoder = self.encoder
        return [m for m in (encoder.backbone, encoder.image_head, encoder.image_projection) if m is not None]

    def train(self, mode: bool = True) -> "LiT":
        """Train mode for the text tower; the locked image tower stays in eval mode (frozen batch norm
        statistics, no dropout), as the paper's locked tower is used as an inference-only feature extractor."""
        super().train(mode)
        for module in self.image_tower():
            module.eval()
        return self

    views = CLIP.views  # CLIP's image-text views

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """This process's image and text embeddings [n, embed_dim]; the image side without autograd (locked)."""
        with torch.no_grad():
            image = self.encoder.encode_image(batch["image"])
        return {"image": image, "text": self.encoder.encode_text(batch["tokens"])}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        scale = self.logits.scale()
        image, text = embeddings["image"], embeddings["text"]
        if self.options.loss == "siglip":
            bias = self.logits.logit_bias
            loss = sigmoid_loss_over_processes(image, text, scale, bias)
            return {"loss": loss, "logit_scale": scale.detach(), "logit_bias": bias.detach()}
        loss = clip_loss(gather_with_grad(image), gather_with_grad(text), scale)
        return {"loss": loss, "logit_scale": scale.detach()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(batch), batch)

    def model_card_extras(self) -> dict:
        return self.logits.card()
