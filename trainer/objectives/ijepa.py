"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture").

From one context block of an image, predict the representations of several target blocks of the same image.
Views: one random resized crop per image (scale 0.3-1) and nothing else: no flip, colour or blur (the paper's "no
hand-crafted augmentation"). Masks are drawn per sample in the data workers (``trainer.data.masking.multi_block_masks``:
4 target blocks of scale 0.15-0.2 and aspect ratio 0.75-1.5, one context block of scale 0.85-1 with the target
patches removed) and travel in the batch as ``masks/global0`` (context indices, then the target blocks' indices).

* Context encoder: the exported ViT on the context patches only (``forward_vit(vit, images, keep=context)``:
  masking by dropping tokens, so the encoder's cost scales with the context).
* Target encoder: an EMA of the context encoder (momentum 0.996 -> 1, linearly over the run as in the authors'
  code) on the whole image without gradient; its patch outputs are layer-normed (``F.layer_norm`` over the
  features, no affine, as the authors' ``forward_target``) and gathered at each target block.
* Predictor (``IJEPAPredictor``): a narrow ViT. The context encoder's patch outputs are embedded linearly to the
  predictor width and given the position embedding of their patch; for each target block, learnable mask tokens
  plus the position embeddings of the block's patches are appended; timm ``Block``s, a LayerNorm and a linear map
  back to the encoder width give the predictions at the block's patches. Each block is predicted in its own
  sequence (the context repeated per block), as the authors do, so blocks do not see each other's positions.
* Loss: ``trainer.losses.ijepa.ijepa_loss``, the paper's L2 (mean squared error per element) by default; the
  authors' released code uses smooth L1 (``loss: smooth_l1``).

Implementation choices and deviations:
* Fixed-shape masks drawn per sample (the authors draw one block size per batch in the collate function and trim
  every context of the batch to the batch's smallest, keeping the first patches in raster order; here a batch is
  stacked from per-sample draws): every target block has the fixed area T of the authors' size rule at the middle of
  the scale and aspect ranges, its shape drawn among the rectangles of that area within the aspect range (8 x 8
  grid: 4 x 3 or 3 x 4, scale 0.19); the context keeps exactly C = int(L * context_ratio) patches (default 0.25:
  16 of 64), a uniformly random subset of the context block minus the targets, redrawn when fewer remain (~4%
  of draws at 8 x 8). The authors' per-batch minimum is of that order (their 7 x 7 context block always sits in
  the top-left corner of an 8 x 8 grid, as their position draw excludes the last row and column; here any
  position is drawn).
* The ViT's position embedding is made the authors' fixed 2-D sin-cos one (zero at the prefix tokens, frozen;
  ``position_embedding: learned`` keeps timm's learnable one). It matters at small scale: on vit-micro-cifar with
  the learnable one the spread of the target features across images falls from 0.83 to 0.22 over 3,000 steps
  while the loss falls to 0.03 (the targets become predictable, apparently from position), and a linear probe
  gains nothing over random init; with sin-cos the spread stays near 0.6 and the probe gains 3.0-3.5 points
  in 1,200 steps (``tests/benchmarks/test_objectives_v_learning.py``).
* The ViT is timm's, with its class token (the authors' ViT has none); the class token takes part in attention
  but in no loss, and the exported feature is the mean of the (normed) patch tokens (``vit_pool="avg"``), the
  average pooling I-JEPA evaluates with. The predictor's position embeddings are fixed 2-D sin-cos, as the
  authors'.
* The exported model is the context encoder (the loop saves ``objective.encoder``); the authors evaluate the
  target encoder, which ends close to it as the momentum reaches 1.
* The loss is averaged over the global batch (all-gather with gradient) so the logged value is the global one;
  nothing else in I-JEPA spans the batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.masking import (
    WithKeepIndices,
    multi_block_context_count,
    multi_block_masks,
    multi_block_target_shapes,
)
from trainer.data.multicrop import MultiCropViews
from trainer.data.views import AugmentConfig
from trainer.distributed import mean_over_processes
from trainer.losses.ijepa import IJEPA_LOSSES, ijepa_loss
from trainer.models import ModelConfig
from trainer.models.vit import forward_vit, patch_grid, vit_backbone

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std
from .mae import POSITION_EMBEDDINGS, sincos_position_embedding_
from .momentum import ema_update_, momentum_copy
from .options import require_at_least, require_in_range, require_momentum_schedule

MASKS = "masks/global0"  # the batch key of the packed masks: C context indices, then M x T target indices


def _range(value, name: str, upper: float = 1.0) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 < low <= high <= upper:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper:g}, got {value}")
    return low, high


def packed_multi_block_masks(grid: tuple[int, int], num_targets: int, target_scale: tuple, target_aspect_ratio: tuple,
                             context_scale: tuple, context_ratio: float,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample's ``multi_block_masks`` as one int64 tensor [C + M * T] (context, then the blocks in order), the
    single tensor ``WithKeepIndices`` carries per view."""
    context, targets = multi_block_masks(grid, num_targets, target_scale, target_aspect_ratio, context_scale,
                                         context_ratio, generator)
    return torch.cat([context, targets.flatten()])


def sincos_positions(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [rows * columns, dim] of a raster-order patch grid (dim % 4 == 0)."""
    from timm.layers import build_sincos2d_pos_embed

    return build_sincos2d_pos_embed(list(grid), dim)


class IJEPAPredictor(nn.Module):
    """I-JEPA's narrow ViT predictor (the authors' ``VisionTransformerPredictor``).

    Args:
        encoder_dim: width of the encoder's patch outputs (and of the predictions).
        grid: (rows, columns) of the patch grid (the position embeddings).
        dim: the predictor's width (paper 384).
        depth: its transformer blocks (paper 12 for ViT-H/14).
        heads: attention heads per block.
        mlp_ratio: MLP hidden width / dim (4).
    """

    def __init__(self, encoder_dim: int, grid: tuple[int, int], dim: int = 384, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.register_buffer("position", sincos_positions(grid, dim), persistent=False)  # a function of the grid
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Linear(dim, encoder_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """The authors' init: truncated normal (std 0.02) linear weights and mask token, zero biases, unit norms, and
        each block's output projections scaled by 1 / sqrt(2 * layer)."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward(self, context: torch.Tensor, context_index: torch.Tensor,
                target_index: torch.Tensor) -> torch.Tensor:
        """Predictions at the target blocks.

        Args:
            context: [n, C, encoder_dim] the context encoder's patch outputs.
            context_index: [n, C] their patch indices (raster order of the grid).
            target_index: [M, n, T] the patch indices of M target blocks per image.
        Returns:
            [M, n, T, encoder_dim].
        """
        blocks, count, size = target_index.shape
        position = self.position.to(context.device)
        tokens = self.embed(context) + position[context_index]  # [n, C, dim]
        queries = self.mask_token + position[target_index]  # [M, n, T, dim]
        tokens = torch.cat([tokens.unsqueeze(0).expand(blocks, -1, -1, -1), queries.to(tokens.dtype)], dim=2)
        tokens = tokens.flatten(0, 1)  # each block in its own sequence: [M * n, C + T, dim]
        for block in self.blocks:
            tokens = block(tokens)
        predictions = self.project(self.norm(tokens[:, -size:]))
        return predictions.view(blocks, count, size, -1)


@dataclass
class IJEPAOptions:
    num_targets: int = 4                      # M target blocks (paper 4)
    target_scale: tuple = (0.15, 0.2)         # fraction of the patches per target block (paper 0.15-0.2)
    target_aspect_ratio: tuple = (0.75, 1.5)  # height / width of a target block (paper 0.75-1.5)
    context_scale: tuple = (0.85, 1.0)        # the context block before the targets are removed (paper 0.85-1)
    context_ratio: float = 0.25               # C / L: patches the context keeps (fixed so masks stack)
    predictor_dim: int = 384                  # the narrow predictor's width (paper 384)
    predictor_depth: int = 12                 # its blocks (paper 12 for ViT-H/14)
    predictor_heads: int = 12                 # its attention heads
    loss: str = "l2"                          # "l2" (the paper) | "smooth_l1" (the authors' code)
    crop_scale: tuple = (0.3, 1.0)            # the random resized crop, the only augmentation (paper 0.3-1)
    momentum: float = 0.996                   # EMA of the target encoder at step 0 (paper 0.996)
    final_momentum: float = 1.0               # ... at the end, linearly (paper 1.0)
    position_embedding: str = "sincos"        # sincos: fixed 2-D sin-cos (the authors' ViT) | learned: timm's

    def __post_init__(self):
        require_at_least(self, 1, "num_targets", "predictor_dim", "predictor_depth", "predictor_heads")
        require_in_range(self, 0.0, 1.0, "context_ratio")
        if not 0.0 < self.context_ratio < 1.0:
            raise ValueError(f"context_ratio must be in (0, 1), got {self.context_ratio}")
        if self.predictor_dim % self.predictor_heads or self.predictor_dim % 4:
            raise ValueError(f"predictor_dim must be a multiple of predictor_heads ({self.predictor_heads}) and of 4 "
                             f"(2-D sin-cos positions), got {self.predictor_dim}")
        if self.loss not in IJEPA_LOSSES:
            raise ValueError(f"loss must be one of {IJEPA_LOSSES}, got {self.loss!r}")
        require_momentum_schedule(self)
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {', '.join(POSITION_EMBEDDINGS)}, "
                             f"got {self.position_embedding!r}")
        self.target_scale = _range(self.target_scale, "target_scale")
        self.target_aspect_ratio = _range(self.target_aspect_ratio, "target_aspect_ratio", upper=math.inf)
        self.context_scale = _range(self.context_scale, "context_scale")
        self.crop_scale = _range(self.crop_scale, "crop_scale")


@register
class IJEPA(Objective):
    key = "ijepa"
    Options = IJEPAOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: IJEPAOptions):
        super().__init__(spec, options)
        vit = vit_backbone(self.encoder, self.key)
        o = options
        self.grid = patch_grid(vit, spec.image_size)
        height, width = multi_block_target_shapes(self.grid, o.target_scale, o.target_aspect_ratio)[0]
        self.target_count = height * width
        self.context_count = multi_block_context_count(self.grid, o.context_ratio)
        try:  # settings that leave no room for the context fail here, not later in a data worker
            generator = torch.Generator().manual_seed(0)
            for _ in range(8):
                multi_block_masks(self.grid, o.num_targets, o.target_scale, o.target_aspect_ratio, o.context_scale,
                                  o.context_ratio, generator, max_tries=200)
        except ValueError as error:
            raise ValueError(f"{self.key}: {error}") from None
        self.predictor = IJEPAPredictor(vit.embed_dim, self.grid, o.predictor_dim, o.predictor_depth,
                                        o.predictor_heads)
        if o.position_embedding == "sincos":
            if vit.embed_dim % 4:
                raise ValueError(f"{self.key}: position_embedding 'sincos' needs a ViT width divisible by 4, got "
                                 f"{vit.embed_dim}")
            sincos_position_embedding_(vit, self.grid)  # before the copy: the target encoder gets it too
        # A deep copy draws no random numbers: every process builds the same target encoder.
        self.target_encoder = momentum_copy(self.encoder)

    def model_config(self, spec: ObjectiveSpec, options: IJEPAOptions) -> ModelConfig:
        """The ViT with the mean of its patch tokens as the feature: I-JEPA evaluates average-pooled patch tokens."""
        return default_model_config(spec, vit_pool="avg")

    def views(self) -> WithKeepIndices:
        config, o = self.encoder.config, self.options
        plain = AugmentConfig(crop_scale=o.crop_scale, flip=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
        crop = MultiCropViews(config.image_size, config.image_size, config.mean, config.std, 0, plain, o.crop_scale,
                              num_global=1)
        draw = functools.partial(packed_multi_block_masks, self.grid, o.num_targets, o.target_scale,
                                 o.target_aspect_ratio, o.context_scale, o.context_ratio)
        return WithKeepIndices(crop, {"global0": draw}, key_prefix="masks")

    def split_masks(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed masks [n, C + M T] -> (context indices [n, C], target indices [M, n, T])."""
        count = masks.shape[0]
        expected = self.context_count + self.options.num_targets * self.target_count
        if masks.dim() != 2 or masks.shape[1] != expected:
            raise ValueError(f"{self.key}: expected packed masks [n, {expected}] (C = {self.context_count}, "
                             f"{self.options.num_targets} x T = {self.target_count}), got {tuple(masks.shape)}")
        masks = masks.long()
        targets = masks[:, self.context_count:].view(count, self.options.num_targets, self.target_count)
        return masks[:, :self.context_count], targets.transpose(0, 1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["global0"]
        context_index, target_index = self.split_masks(batch[MASKS].to(images.device))
        with torch.no_grad():  # targets first: their activations are freed before the online graph is built
            patches = forward_vit(vit_backbone(self.target_encoder, self.key), images).patches
            patches = F.layer_norm(patches.float(), (patches.shape[-1],))
            rows = torch.arange(images.shape[0], device=images.device).view(1, -1, 1)
            targets = patches[rows, target_index]  # [M, n, T, D]
        context = forward_vit(vit_backbone(self.encoder, self.key), images, keep=context_index).patches
        predictions = self.predictor(context, context_index, target_index)
        loss = ijepa_loss(predictions, targets, self.options.loss, mean_over_processes)
        return {"loss": loss, "embedding_std": embedding_std(context.mean(dim=1)),
                "target_std": targets.std(dim=(0, 1, 2)).mean()}

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The authors' linear schedule: ``momentum`` at step 0 to ``final_momentum`` at ``total_steps``."""
        progress = min(max(step, 0), total_steps) / max(total_steps, 1)
        return self.options.momentum + (self.options.final_momentum - self.options.momentum) * progress

    def after_step(self, step: int, total_steps: int) -> None:
        ema_update_(self.target_encoder, self.encoder, self.momentum_at(step + 1, total_steps))
