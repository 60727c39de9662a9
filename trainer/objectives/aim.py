"""AIM (El-Nouby et al. 2024, "Scalable Pre-training of Large Autoregressive Image Models").

A ViT pre-trained like a language model: the image is the raster-order sequence of its L patches and the
output at each position predicts the NEXT patch's pixels. Attention is prefix-causal (PrefixLM, sec. 3): per
image a prefix length S is drawn uniformly from {1, ..., L - 1}; the first S patches attend bidirectionally
among themselves, every later patch attends to the prefix and causally to the patches before it, and the loss
(``trainer.losses.aim``) covers only the L - S non-prefix patches: the prefix is context, so that the trunk
also learns the bidirectional attention it is evaluated with. The outputs go through an MLP head (sec. 3,
"prediction heads": a linear map to the head width, N residual pre-norm MLP blocks with expansion 4, a norm
and a linear map to the patch's p * p * C pixels, no biases), applied to every position independently and
discarded after pre-training, with a fixed 2D sin-cos position embedding added to its input (the paper adds one
before the head). Targets are the per-patch normalised pixels (the paper's default); the loss is the squared
error, averaged per image over its scored patches, then over images. One view per image: RandomResizedCrop
(scale 0.4-1) and a horizontal flip, nothing else (the paper's augmentation).

Implementation choices:
- The prefix lengths are drawn in the data workers (``WithKeepIndices`` under ``prefix/image``, seeded per
  worker and rank, like the other masks here), not in ``forward``; the step builds the [N, 1, T, T] mask from
  them (``trainer.data.masking.prefix_causal_attention_mask``) and passes it to every block (``forward_vit``).
- The ViT's class token (and any register tokens) are part of the bidirectional prefix: they attend to the
  prefix patches only, and every patch may attend to them. They carry nothing beyond the prefix to later
  patches (causality holds; the tests check it through the real ViT), and the exported model's full attention
  is exactly this mask with S = L, so the class token sees at export what it saw in training (a class token
  that attended only to itself would suddenly see every patch at export). AIM itself has no class token.
- The head runs only on the positions whose next patch is scored (about half of them), which saves compute;
  the others would be masked out of the loss anyway.
- ``prefix_attention: false`` gives the paper's ablation baseline, plain causal attention with every patch
  after the first scored.
- The exported model (``objective.encoder``) runs with full attention (the "prefix = everything" model AIM
  evaluates) and its feature is the mean of the patch tokens (``vit_pool="avg"``; AIM probes the patch features
  with an attentive probe, which this repository's exported models have no place for).

Deviations: the trunk is this repository's timm ViT (learned position embedding, biases, a class token) where
AIM uses sin-cos position embeddings, no biases and no class token; the head's mean squared error is over the
pixel values (the paper sums over them: a constant factor); the head is scaled down in the recipe.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.masking import WithKeepIndices, prefix_causal_attention_mask, random_prefix_length
from trainer.data.views import AugmentConfig, OneView, view_configs
from trainer.losses.aim import aim_loss, non_prefix_mask
from trainer.models import ModelConfig
from trainer.models.vit import (
    forward_vit,
    normalise_patches,
    patch_grid,
    patch_size,
    patchify,
    vit_backbone,
)

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std
from .options import require_at_least, require_positive

# The paper's augmentation: a random resized crop (scale 0.4-1) and a horizontal flip, no colour distortion.
PAPER_AUGMENT = {"crop_scale": (0.4, 1.0), "flip": 0.5, "jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0}
VIEW = "image"


class AIMHeadBlock(nn.Module):
    """x + MLP(LayerNorm(x)), MLP = Linear(d, ratio * d) - GELU - Linear(ratio * d, d), no biases (AIM's head)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class AIMHead(nn.Module):
    """[..., in_dim] -> [..., out_dim]: Linear to ``hidden_dim``, ``blocks`` residual MLP blocks, LayerNorm,
    Linear to the pixels of a patch; every token independently."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, blocks: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            *[AIMHeadBlock(hidden_dim, mlp_ratio) for _ in range(blocks)],
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):  # the ViT's init (timm / MAE: truncated normal, std 0.02)
                nn.init.trunc_normal_(module.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass
class AIMOptions:
    head_blocks: int = 12                  # N residual MLP blocks in the head (paper 12)
    head_hidden_dim: int = 2048            # the head's width (paper 2048)
    head_mlp_ratio: float = 4.0            # expansion of each head MLP (paper 4, as in the trunk)
    head_position_embedding: bool = True   # add a fixed 2D sin-cos position embedding before the head (paper)
    normalise_targets: bool = True         # per-patch normalised pixels as targets (paper's default)
    prefix_attention: bool = True          # False: plain causal attention, no prefix (the paper's ablation)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields of the view

    def __post_init__(self):
        require_at_least(self, 0, "head_blocks")
        require_at_least(self, 1, "head_hidden_dim")
        require_positive(self, "head_mlp_ratio")
        for name in ("head_position_embedding", "normalise_targets", "prefix_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class AIM(Objective):
    key = "aim"
    Options = AIMOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: AIMOptions):
        super().__init__(spec, options)
        vit = vit_backbone(self.encoder, self.key)
        rows, columns = patch_grid(vit, spec.image_size)
        self.num_patches = rows * columns
        if self.num_patches < 2:
            raise ValueError(f"{self.key}: a {rows} x {columns} patch grid has no next patch to predict; use "
                             f"images of at least two patches")
        self.patch = patch_size(vit)
        channels = self.encoder.config.channels
        dim = vit.embed_dim
        self.head = AIMHead(dim, options.head_hidden_dim, self.patch * self.patch * channels, options.head_blocks,
                            options.head_mlp_ratio)
        if options.head_position_embedding:
            if dim % 4:
                raise ValueError(f"{self.key}: head_position_embedding needs a ViT width divisible by 4 (2D "
                                 f"sin-cos), got {dim}; set head_position_embedding: false")
            from timm.layers import build_sincos2d_pos_embed

            # A fixed function of the grid: not saved in checkpoints.
            self.register_buffer("head_position", build_sincos2d_pos_embed([rows, columns], dim), persistent=False)
        else:
            self.head_position = None

    def model_config(self, spec: ObjectiveSpec, options: AIMOptions) -> ModelConfig:
        """The ViT with full attention and the mean of its patch tokens as the feature."""
        return default_model_config(spec, vit_pool="avg")

    def views(self):
        config = self.encoder.config
        view = OneView(config.image_size, config.mean, config.std, AugmentConfig(**self.options.augment))
        if not self.options.prefix_attention:
            return view
        return WithKeepIndices(view, {VIEW: functools.partial(random_prefix_length, self.num_patches)},
                               key_prefix="prefix")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch[VIEW]
        count = images.shape[0]
        if self.options.prefix_attention:
            prefix_lengths = batch[f"prefix/{VIEW}"].to(images.device, torch.long).reshape(count)
        else:
            prefix_lengths = torch.zeros(count, dtype=torch.long, device=images.device)
        vit = vit_backbone(self.encoder, self.key)
        attention = prefix_causal_attention_mask(self.num_patches, prefix_lengths, vit.num_prefix_tokens)
        patches = forward_vit(vit, images, attn_mask=attention).patches  # [N, L, D]
        tokens = patches if self.head_position is None else patches + self.head_position.to(patches.dtype)
        scored = non_prefix_mask(prefix_lengths, self.num_patches)  # [N, L] over the target patches
        # Output k predicts patch k + 1: run the head only where that patch is scored.
        predicting = F.pad(scored[:, 1:], (0, 1), value=False)
        outputs = self.head(tokens[predicting])
        predictions = outputs.new_zeros(count, self.num_patches, outputs.shape[-1])
        predictions[predicting] = outputs
        targets = patchify(images, self.patch)
        if self.options.normalise_targets:
            targets = normalise_patches(targets)
        loss = aim_loss(predictions, targets, scored)
        return {"loss": loss, "prefix_length": prefix_lengths.float().mean(),
                "embedding_std": embedding_std(patches.mean(dim=1))}
