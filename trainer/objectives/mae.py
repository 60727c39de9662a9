"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

One view per image (random resized crop, scale 0.2-1, and a horizontal flip; no colour jitter, the paper's
augmentation). ``mask_ratio`` (75%) of its patches are masked at random, a mask per image drawn in the data
workers (``trainer.data.masking.random_keep`` through ``WithKeepIndices``, the kept patches travel as
``keep/image``). The encoder, the exported ViT, runs on the visible patches only (``forward_vit(keep=...)``,
class token kept), so masking saves encoder compute. A light decoder reconstructs the image: a linear map from
the encoder width to ``decoder_width``, the encoded tokens unshuffled back to raster order with a learnable mask
token at every masked position, fixed 2-D sin-cos position embeddings (zero at the class token), ``decoder_depth``
timm ``Block``s with ``decoder_heads`` heads, a LayerNorm and a linear map to the patch * patch * 3 pixels of every
patch. The loss is the mean squared error on the masked patches only (``masked_pixel_mse``), against each patch's
pixels standardised by its own mean and variance with ``norm_pix_loss`` (the paper's better setting).

Implementation choices:
* Targets are patches of the image the encoder is given, i.e. after the run's mean/std normalisation, as the
  authors compute them (``patchify(imgs)`` of the normalised batch); with ``norm_pix_loss`` the per-patch
  standardisation removes that affine map anyway. The per-patch variance is the unbiased one, as in the authors'
  code (``normalise_patches`` in ``trainer.models.vit``).
* ``encoder_init="mae"`` re-initialises the ViT as the authors do (xavier-uniform linear layers and patch
  projection, class and register tokens N(0, 0.02)) and ``position_embedding="sincos"`` makes its position
  embedding the fixed 2-D sin-cos one (frozen; zero at the prefix tokens), as the paper's encoder has it; both
  are also what lightly's ``MaskedVisionTransformerTIMM`` does by default. "timm" / "learned" keep timm's init
  and learnable position embedding. The exported model's architecture is unchanged.
* The exported feature is the class token (``vit_pool="token"``), what the paper's linear probe reads. When a
  ViT pools the mean with its norm after the pooling (timm's ``fc_norm``), that norm is applied to every encoded
  token before the decoder, so the decoder always reads the final normalised tokens.
* The decoder predicts every patch (as the authors' code); only the masked ones are scored. The loss is a mean
  over a fixed number of masked patches per image, so DDP's gradient average equals the global-batch loss.
* Weight decay as the authors' (timm's ``add_weight_decay``): none on biases and 1-D parameters; the class and
  mask tokens take it. ViT backbones only: a CNN is refused by ``vit_backbone`` naming the ViT backbones.
Deviations: the paper's ViT-L/16 with a 512-wide, 8-block decoder at 224 px becomes a ViT of this repository at
32 px (patch 4) with a smaller decoder (the recipe); no drop-path or layer-wise schedules (none in pretraining).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.data.masking import WithKeepIndices, random_keep
from trainer.data.views import AugmentConfig, OneView, view_configs
from trainer.losses.masked_pixels import masked_pixel_mse
from trainer.models import ModelConfig
from trainer.models.vit import forward_vit, patch_grid, patch_size, patchify, vit_backbone

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std
from .options import as_number, require_at_least

# The paper's augmentation: random resized crop (scale 0.2-1) and flip only.
PAPER_AUGMENT = {"crop_scale": [0.2, 1.0], "flip": 0.5, "jitter_prob": 0.0, "grayscale_prob": 0.0,
                 "blur_prob": 0.0}
ENCODER_INITS = ("mae", "timm")
POSITION_EMBEDDINGS = ("sincos", "learned")


def sincos_2d(dim: int, rows: int, columns: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding [rows * columns, dim], raster order: the first dim/2 values
    encode the column and the last dim/2 the row (the authors' ``meshgrid(w, h)`` order), each half as
    [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim / 4)), k = 0 .. dim/4 - 1."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float64).reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row, column = torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij")
    return torch.cat([one_axis(column), one_axis(row)], dim=1).float()


def final_tokens(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``forward_vit``'s tokens after the ViT's final LayerNorm. timm ViTs that pool the mean may move that norm
    after the pooling (``norm`` Identity, ``fc_norm`` a LayerNorm); then it is applied here to every token (it
    is per token), as the paper's encoder ends, and it takes part in (and is trained by) the loss."""
    return vit.fc_norm(tokens) if isinstance(vit.norm, nn.Identity) else tokens


def _linear_init(module: nn.Module) -> None:
    """The authors' ``_init_weights``: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def mae_init_(vit: nn.Module) -> None:
    """Re-initialise a timm ViT as the MAE authors' encoder: the patch projection xavier-uniform as a linear map
    (its bias as built), class / register tokens N(0, 0.02), every Linear and LayerNorm by ``_linear_init``."""
    weight = vit.patch_embed.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for token in (vit.cls_token, vit.reg_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)
    vit.apply(_linear_init)


def sincos_position_embedding_(vit: nn.Module, grid: tuple[int, int]) -> None:
    """Make the ViT's position embedding MAE's fixed 2-D sin-cos one (zero at the prefix tokens), frozen."""
    embedding = vit.pos_embed
    patches = grid[0] * grid[1]
    prefix = embedding.shape[1] - patches
    with torch.no_grad():
        embedding.zero_()
        embedding[0, prefix:] = sincos_2d(embedding.shape[-1], *grid).to(embedding.dtype)
    embedding.requires_grad_(False)


class MAEDecoder(nn.Module):
    """MAE's decoder: encoded visible tokens (prefix first) -> predicted pixels of every patch [N, L, P]."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], num_prefix_tokens: int, patch_pixels: int,
                 width: int, depth: int, heads: int):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        position = torch.cat([torch.zeros(num_prefix_tokens, width), sincos_2d(width, *grid)])
        self.register_buffer("position", position.unsqueeze(0), persistent=False)  # fixed: a function of the grid
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(width)
        self.predict = nn.Linear(width, patch_pixels)
        self.apply(_linear_init)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``tokens`` [N, P + K, D] (prefix, then the kept patches in the order of ``keep`` [N, K] or [K])."""
        x = self.embed(tokens)
        count, width = x.shape[0], x.shape[-1]
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        keep = keep.to(x.device, torch.long)
        if keep.dim() == 1:
            keep = keep.expand(count, -1)
        # Unshuffle: every position holds the mask token except the kept ones, which get their encoded token.
        canvas = self.mask_token.to(x.dtype).expand(count, self.num_patches, width)
        patches = canvas.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), visible)
        x = torch.cat([prefix, patches], dim=1) + self.position.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.predict(x[:, self.num_prefix_tokens:])


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75              # fraction of the patches masked (paper 0.75)
    decoder_width: int = 512              # decoder embedding width (paper 512)
    decoder_depth: int = 8                # decoder Transformer blocks (paper 8)
    decoder_heads: int = 16               # decoder attention heads (paper 16)
    norm_pix_loss: bool = True            # per-patch standardised pixel targets (the paper's better setting)
    encoder_init: str = "mae"             # mae: the authors' xavier init of the ViT | timm: as built
    position_embedding: str = "sincos"    # sincos: fixed 2-D sin-cos (paper) | learned: timm's learnable one
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields of the view

    def __post_init__(self):
        if not 0.0 <= as_number(self, "mask_ratio") < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        require_at_least(self, 1, "decoder_width", "decoder_depth", "decoder_heads")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_width {self.decoder_width} is not divisible by decoder_heads "
                             f"{self.decoder_heads}")
        if self.decoder_width % 4:
            raise ValueError(f"decoder_width must be a multiple of 4 (2-D sin-cos position embedding), got "
                             f"{self.decoder_width}")
        if not isinstance(self.norm_pix_loss, bool):
            raise ValueError(f"norm_pix_loss must be true or false, got {self.norm_pix_loss!r}")
        if self.encoder_init not in ENCODER_INITS:
            raise ValueError(f"encoder_init must be one of {ENCODER_INITS}, got {self.encoder_init!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got "
                             f"{self.position_embedding!r}")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class MAE(Objective):
    key = "mae"
    Options = MAEOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: MAEOptions):
        super().__init__(spec, options)
        vit = vit_backbone(self.encoder, self.key)
        self.grid = patch_grid(vit, spec.image_size)
        self.patch = patch_size(vit)
        if options.position_embedding == "sincos" and vit.embed_dim % 4:
            raise ValueError(f"{self.key}: position_embedding 'sincos' needs a ViT width divisible by 4, got "
                             f"{vit.embed_dim}")
        if options.encoder_init == "mae":
            mae_init_(vit)
        if options.position_embedding == "sincos":
            sincos_position_embedding_(vit, self.grid)
        channels = self.encoder.config.channels
        self.decoder = MAEDecoder(vit.embed_dim, self.grid, vit.num_prefix_tokens, self.patch ** 2 * channels,
                                  options.decoder_width, options.decoder_depth, options.decoder_heads)

    def model_config(self, spec: ObjectiveSpec, options: MAEOptions) -> ModelConfig:
        return default_model_config(spec, vit_pool="token")  # the class token, what the paper's linear probe reads

    def views(self) -> WithKeepIndices:
        config = self.encoder.config
        view = OneView(config.image_size, config.mean, config.std, AugmentConfig(**self.options.augment))
        return WithKeepIndices(view, {"image": functools.partial(random_keep, self.grid, self.options.mask_ratio)})

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images, keep = batch["image"], batch["keep/image"]
        vit = vit_backbone(self.encoder, self.key)
        encoded = forward_vit(vit, images, keep=keep)
        predictions = self.decoder(final_tokens(vit, encoded.tokens), keep)
        count, length = predictions.shape[:2]
        keep = keep.to(images.device, torch.long).expand(count, -1)
        mask = torch.ones(count, length, dtype=torch.bool, device=images.device).scatter_(1, keep, False)
        loss = masked_pixel_mse(predictions, patchify(images, self.patch), mask,
                                normalise_targets=self.options.norm_pix_loss)
        return {"loss": loss, "embedding_std": embedding_std(encoded.features)}
