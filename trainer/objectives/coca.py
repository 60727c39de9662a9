"""CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models").

One image-text model trained with two losses at once: a contrastive loss between the image embedding and the
text embedding (CLIP's symmetric cross-entropy over the global batch, learnable temperature) and a captioning
loss, the next-token cross-entropy of a multimodal text decoder that cross-attends to the image's tokens while
reading the caption causally (teacher forcing). L = lambda_Con * L_Con + lambda_Cap * L_Cap with the paper's
weights 1 and 2 (``contrastive_weight``, ``caption_weight``).

The model is open_clip's ``CoCa`` (randomly initialised), stored whole in ``RUN/model`` under ``coca.*``: the
ViT image tower with an attentional pooler, the unimodal text tower (causal, with a class token appended whose
output is the text embedding) and the multimodal decoder. ``python -m export`` writes the image and text
encoders plus the two graphs greedy caption generation needs (``export/captions.py``).

Choices and deviations:
* The image tower is open_clip's ViT, sized from ``--backbone`` (``vit-micro-cifar``, ``vit-tiny-cifar`` or
  ``vit-small-cifar``: that ViT's width, depth and heads, patch 4 up to 64 px) unless ``vision_width`` /
  ``vision_layers`` / ``vision_heads`` / ``patch_size`` say otherwise; any other backbone is refused (CoCa needs
  the ViT's patch tokens for its pooler, and open_clip's CoCa builds its own tower).
* Pooling is open_clip's CoCa pooler: one attentional pooler of ``image_queries`` queries whose first output is
  the contrastive embedding and the others the decoder's image tokens (the paper: two poolers, 1 and 256 queries).
  Keeping open_clip's layout lets ``python -m export --format open_clip`` hand the model to open_clip unchanged.
* open_clip ties the widths: text tower = decoder = ``embed_dim``. Text and decoder split the paper's text
  decoder in two (``text_layers`` unimodal + ``decoder_layers`` multimodal), context 32 tokens at CIFAR scale.
* The temperature is CoCa's own ``logit_scale`` (it travels with the model), from 1/0.07, clamped at 100 as CLIP.
* The caption loss is the mean over every caption token of the global batch (sums and token counts added over
  processes), so 2 processes give the loss of 1; open_clip averages per process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from trainer.distributed import all_reduce_sum, gather_with_grad
from trainer.losses import caption_token_nll, clip_loss
from trainer.models import ModelConfig
from trainer.models.text import CLIP_VOCAB_SIZE

from .base import Objective, ObjectiveSpec, register
from .clip import CLIP
from .options import check_crop_scale, require_at_least, require_non_negative, require_positive

# The --backbone names CoCa's ViT image tower takes its size from: (width, layers, heads), the sizes of the
# vit-*-cifar backbones of trainer/models/backbones.py.
VISION_SIZES: dict[str, tuple[int, int, int]] = {
    "vit-micro-cifar": (64, 2, 2), "vit-tiny-cifar": (192, 6, 3), "vit-small-cifar": (384, 8, 6),
}


@dataclass
class CoCaOptions:
    embed_dim: int = 256            # joint image-text space; also the text tower's and decoder's width (open_clip)
    text_layers: int = 4            # unimodal text layers (causal self-attention only)
    decoder_layers: int = 4         # multimodal layers (causal self-attention + cross-attention to image tokens)
    text_heads: int = 4             # attention heads of the text tower and the decoder
    context_length: int = 32        # caption tokens, start and end included
    image_queries: int = 64         # attentional-pooler queries: 1 contrastive + (queries - 1) decoder image tokens
    pooler_heads: int = 4
    vision_width: int | None = None   # None: from --backbone (VISION_SIZES)
    vision_layers: int | None = None
    vision_heads: int | None = None
    patch_size: int | None = None     # None: 4 px up to 64 px images (as vit-*-cifar), else 16
    caption_weight: float = 2.0       # lambda_Cap (paper: 2)
    contrastive_weight: float = 1.0   # lambda_Con (paper: 1)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    crop_scale: tuple[float, float] = (0.8, 1.0)

    def __post_init__(self) -> None:
        require_at_least(self, 1, "embed_dim", "text_layers", "decoder_layers", "text_heads", "pooler_heads")
        require_at_least(self, 2, "context_length", "image_queries")
        for name in ("vision_width", "vision_layers", "vision_heads", "patch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null: from --backbone), got {getattr(self, name)}")
        for heads in ("text_heads", "pooler_heads"):
            if self.embed_dim % getattr(self, heads):
                raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of {heads} ({getattr(self, heads)})")
        require_non_negative(self, "caption_weight", "contrastive_weight")
        if self.caption_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("caption_weight and contrastive_weight are both 0: nothing to train")
        require_positive(self, "init_temperature", "max_logit_scale")
        self.crop_scale = check_crop_scale(self.crop_scale)


def coca_model_config(spec: ObjectiveSpec, options: CoCaOptions) -> dict:
    """open_clip's CoCa model config (its model-config JSON layout) for ``spec``'s image size and backbone name."""
    sized = None not in (options.vision_width, options.vision_layers, options.vision_heads)
    if spec.backbone not in VISION_SIZES and not sized:
        raise ValueError(f"coca builds open_clip's ViT as its image tower: --backbone must be one of "
                         f"{sorted(VISION_SIZES)} (its width, depth and heads size the tower), or give vision_width, "
                         f"vision_layers and vision_heads; got {spec.backbone!r}")
    width, layers, heads = VISION_SIZES.get(spec.backbone, (0, 0, 0))
    width, layers = options.vision_width or width, options.vision_layers or layers
    heads = options.vision_heads or heads
    patch = options.patch_size or (4 if spec.image_size <= 64 else 16)
    if width % heads:
        raise ValueError(f"coca: vision width {width} must be a multiple of vision heads {heads}")
    if spec.image_size % patch:
        raise ValueError(f"coca: image size {spec.image_size} must be a multiple of the patch size {patch}")
    return {
        "embed_dim": options.embed_dim,
        "vision_cfg": {"image_size": spec.image_size, "layers": layers, "width": width, "head_width": width // heads,
                       "patch_size": patch, "attentional_pool": True, "attn_pooler_queries": options.image_queries,
                       "attn_pooler_heads": options.pooler_heads, "output_tokens": True},
        "text_cfg": {"context_length": options.context_length, "vocab_size": CLIP_VOCAB_SIZE,
                     "width": options.embed_dim, "heads": options.text_heads, "layers": options.text_layers,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": options.context_length, "vocab_size": CLIP_VOCAB_SIZE,
                           "width": options.embed_dim, "heads": options.text_heads, "layers": options.decoder_layers,
                           "attn_pooler_heads": options.pooler_heads},
    }


@register
class CoCa(Objective):
    key = "coca"
    Options = CoCaOptions
    requires_text = True  # trains on captions: shards without text are refused (BuildViews)
    requires_patch_tokens: ClassVar[bool] = True  # a ViT image tower (see VISION_SIZES)

    def __init__(self, spec: ObjectiveSpec, options: CoCaOptions):
        super().__init__(spec, options)
        if getattr(spec, "init_from", None) is None:  # weights given by --init-from keep their own scale
            with torch.no_grad():
                self.encoder.coca.logit_scale.fill_(math.log(1.0 / options.init_temperature))

    def model_config(self, spec: ObjectiveSpec, options: CoCaOptions) -> ModelConfig:
        if spec.register_tokens or spec.vit_pool is not None:
            raise ValueError("coca: register tokens and vit_pool do not apply (open_clip's ViT with CoCa's "
                             "attentional pooler)")
        return ModelConfig(backbone=spec.backbone, image_size=spec.image_size, mean=spec.mean, std=spec.std,
                           coca=coca_model_config(spec, options))

    views = CLIP.views  # CLIP's image-text views

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """This process's image and text embeddings [n, embed_dim] and each caption's summed next-token NLL [n]
        (the split ``trainer.grad_cache`` uses: every one is a per-sample quantity)."""
        coca, tokens = self.encoder.coca, batch["tokens"]
        image, image_tokens = coca.visual(batch["image"])
        text, text_tokens = coca.text(tokens)
        # Teacher forcing: the decoder reads tokens 0..L-2 and predicts tokens 1..L-1.
        logits = coca.text_decoder(image_tokens, text_tokens[:, :-1])
        nll, _ = caption_token_nll(logits, tokens[:, 1:], coca.pad_id)
        return {"image": image, "text": text, "caption_nll": nll}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        options = self.options
        scale = self.encoder.coca.logit_scale.exp().clamp(max=options.max_logit_scale)
        contrastive = clip_loss(gather_with_grad(embeddings["image"]), gather_with_grad(embeddings["text"]), scale)
        # The mean over the global batch's caption tokens: summed NLLs gathered, token counts summed.
        count = all_reduce_sum((batch["tokens"][:, 1:] != self.encoder.coca.pad_id).sum().float())
        caption = gather_with_grad(embeddings["caption_nll"]).sum() / count.clamp(min=1)
        loss = options.contrastive_weight * contrastive + options.caption_weight * caption
        return {"loss": loss, "contrastive_loss": contrastive.detach(), "caption_loss": caption.detach(),
                "logit_scale": scale.detach()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(batch), batch)
