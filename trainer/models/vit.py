"""Patch-token access to the ViT backbones (timm ``VisionTransformer``: ``vit-tiny-cifar``, ``vit-small-cifar``,
``timm:vit_*``), for objectives that mask patches or read patch tokens (MSN, MAE, iBOT, I-JEPA, ...).

``forward_vit(vit, images, keep)`` runs timm's own modules in timm's order (patch embedding, position embedding,
prefix tokens, ``pos_drop`` / ``patch_drop`` / ``norm_pre``, the blocks, the final norm, ``forward_head``), with two
additions:

* ``keep``: indices of the patch tokens to keep (``trainer.data.masking``), one set for the batch [K] or one per
  image [N, K]; the others are dropped after the position embedding and before the blocks, so the blocks run on
  the prefix tokens and K patches only (masking by dropping tokens, MSN sec. 3 / MAE sec. 3).
* ``mask`` and ``mask_token``: a boolean [N, L] over the raster-order patches; the patch embeddings where it is
  True are replaced by the learnable ``mask_token`` [D] before the position embedding is added, and every token
  goes through the blocks (mask tokens inside the encoder: SimMIM sec. 3.1, BEiT / iBOT's ``masked_embed``).
* ``attn_mask``: an attention mask every block applies (timm ``Block(x, attn_mask)``: boolean, True = may
  attend, or additive float), [T, T] or [N, 1, T, T] over the P + K tokens (AIM's prefix-causal attention).
* images of another size than the one the ViT was built for (multiple of the patch size): the position
  embedding of the patches is resampled to the image's grid (timm's ``resample_abs_pos_embed``, bicubic), as the
  MSN / DINO code does for small crops. The exported model (``vit.forward``) keeps its fixed input size.

With ``keep=None`` at the built size, ``features`` equals ``vit(images)`` (the backbone's feature, what the
exported model computes). ``vit_backbone(encoder, objective)`` returns an ``EmbeddingModel``'s ViT, or raises a
ValueError naming the objective and the backbone when it is not a plain ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VIT_BACKBONES = "vit-tiny-cifar, vit-small-cifar, timm:vit_*"


def is_vit(module: nn.Module) -> bool:
    """True when ``module`` is a timm ``VisionTransformer`` (what ``forward_vit`` runs)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)


def vit_backbone(encoder: nn.Module, objective: str) -> nn.Module:
    """The ViT of ``encoder`` (an ``EmbeddingModel`` whose backbone is one ViT, or a ViT itself), or a ValueError:
    "msn needs a ViT backbone (vit-tiny-cifar, vit-small-cifar, timm:vit_*), got cnn-small"."""
    backbone = getattr(encoder, "backbone", encoder)
    if not is_vit(backbone):
        config = getattr(encoder, "config", None)
        name = getattr(config, "backbone", type(backbone).__name__)
        raise ValueError(f"{objective} needs a ViT backbone ({VIT_BACKBONES}), got {name}")
    return backbone


def patch_size(vit: nn.Module) -> int:
    """The side of the ViT's (square) patches in pixels."""
    height, width = vit.patch_embed.patch_size
    if height != width:
        raise ValueError(f"non-square patches {height} x {width} are not supported")
    return int(height)


def patch_grid(vit: nn.Module, image_size: int) -> tuple[int, int]:
    """(rows, columns) of patches of a square ``image_size`` image; the size must be a multiple of the patch."""
    patch = patch_size(vit)
    if image_size < patch or image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the ViT's patch size {patch}")
    return image_size // patch, image_size // patch


@dataclass
class ViTOutput:
    """What ``forward_vit`` returns: the pooled feature and every output token (after the final norm)."""

    features: torch.Tensor  # [N, D] the backbone's feature (class token, or the pool timm is built with)
    tokens: torch.Tensor  # [N, P + K, D] the P prefix tokens (class, registers), then the K kept patch tokens
    num_prefix_tokens: int

    @property
    def prefix(self) -> torch.Tensor:
        """[N, P, D]: the class token first (when the ViT has one), then register tokens."""
        return self.tokens[:, :self.num_prefix_tokens]

    @property
    def patches(self) -> torch.Tensor:
        """[N, K, D]: the kept patch tokens, in the order of ``keep`` (raster order without it)."""
        return self.tokens[:, self.num_prefix_tokens:]


def _position_embeddings(vit: nn.Module, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(position embedding of the prefix tokens [1, P, D] or None, of the patches [1, rows * columns, D])."""
    from timm.layers import resample_abs_pos_embed

    embedding = vit.pos_embed
    prefix_count = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix, patches = embedding[:, :prefix_count], embedding[:, prefix_count:]
    built = tuple(vit.patch_embed.grid_size)
    if tuple(grid) != built:
        patches = resample_abs_pos_embed(patches, new_size=list(grid), old_size=list(built), num_prefix_tokens=0)
    return (prefix if prefix_count else None), patches


def _keep_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``tokens`` [N, L, D] at ``keep`` [K] (shared) or [N, K] (per image) -> [N, K, D]."""
    keep = keep.to(tokens.device, torch.long)
    if keep.dim() == 1:
        return tokens[:, keep]
    if keep.dim() != 2 or keep.shape[0] != tokens.shape[0]:
        raise ValueError(f"keep must be [K] or [N, K] with N = {tokens.shape[0]}, got {tuple(keep.shape)}")
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def forward_vit(vit: nn.Module, images: torch.Tensor, keep: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> ViTOutput:
    """Run a timm ViT on ``images`` [N, C, H, W] (H = W, a multiple of the patch size) keeping only the patch
    tokens ``keep`` ([K] for the whole batch or [N, K] per image, indices into the raster-order patch grid;
    None keeps all), with the patches where ``mask`` [N, L] is True replaced by ``mask_token`` [D] and every
    block attending under ``attn_mask``. Returns the pooled feature and the output tokens (``ViTOutput``)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"forward_vit takes square images, got {tuple(images.shape[-2:])}")
    grid = patch_grid(vit, images.shape[-1])
    # PatchEmbed's own steps (proj, flatten to tokens, norm) without its fixed-size check.
    patches = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
    patches = vit.patch_embed.norm(patches)
    if mask is not None:
        if mask_token is None:
            raise ValueError("forward_vit: a mask needs the mask_token that replaces the masked patches")
        if mask.shape != patches.shape[:2]:
            raise ValueError(f"mask must be [N, L] = {tuple(patches.shape[:2])} (one flag per patch), "
                             f"got {tuple(mask.shape)}")
        patches = torch.where(mask.to(patches.device, torch.bool).unsqueeze(-1),
                              mask_token.to(patches.dtype).reshape(1, 1, -1), patches)
    prefix_position, patch_position = _position_embeddings(vit, grid)
    patches = patches + patch_position
    if keep is not None:
        patches = _keep_tokens(patches, keep)
    count = patches.shape[0]
    prefix = [token.expand(count, -1, -1) for token in (vit.cls_token, vit.reg_token) if token is not None]
    if prefix:
        prefix_tokens = torch.cat(prefix, dim=1)
        if prefix_position is not None:
            prefix_tokens = prefix_tokens + prefix_position
        tokens = torch.cat([prefix_tokens, patches], dim=1)
    else:
        tokens = patches
    tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens)))
    if attn_mask is None:
        tokens = vit.blocks(tokens)
    else:
        for block in vit.blocks:
            tokens = block(tokens, attn_mask=attn_mask)
    tokens = vit.norm(tokens)
    return ViTOutput(vit.forward_head(tokens), tokens, vit.num_prefix_tokens)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, patch * patch * C]: each raster-order patch's pixels, (row, column, channel) order
    (MAE's ``patchify``), the targets of the pixel-reconstruction objectives (MAE, SimMIM, AIM)."""
    count, channels, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height} x {width} is not a multiple of the patch size {patch}")
    rows, columns = height // patch, width // patch
    grid = images.reshape(count, channels, rows, patch, columns, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(count, rows * columns, patch * patch * channels)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """The inverse of ``patchify`` for a square grid: [N, L, patch * patch * C] -> [N, C, H, W]."""
    count, length, _ = patches.shape
    side = int(round(length ** 0.5))
    if side * side != length:
        raise ValueError(f"unpatchify needs a square grid, got {length} patches")
    grid = patches.reshape(count, side, side, patch, patch, channels)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(count, channels, side * patch, side * patch)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels [..., P] standardised by its own mean and variance (MAE's ``norm_pix_loss`` target,
    AIM's target): (x - mean) / sqrt(var + eps) with the unbiased variance (``torch.var``'s default), as the MAE
    authors' code and lightly's ``normalize_mean_var`` compute it."""
    mean = patches.mean(dim=-1, keepdim=True)
    variance = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (variance + eps).sqrt()
