"""Patch-grid view recipes (CPC): one image -> its grid of overlapping patches, made in the data workers.

The image gets an image-level random resized crop and flip (the papers' random crop of the rescaled image),
is cut into the grid of ``patch`` px patches at ``stride`` with ``Tensor.unfold`` (``grid_patches``, the same
op the exported ``PatchGridEncoder`` uses), and, for CPC v2, each patch is augmented on its own, all patches
of the image at once: a random crop resized back to ``patch`` px and a flip (one affine resampling per patch,
``F.affine_grid`` + ``F.grid_sample``) and colour dropping (all but one random channel set to 0 after
normalisation, i.e. to the dataset mean; Hénaff et al. drop two of the three colour channels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from trainer.models.embedding import grid_patches


@dataclass
class PatchAugmentConfig:
    """Per-patch augmentation (CPC v2); the defaults leave patches untouched."""

    crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction of a patch kept, resized back to full size
    flip: float = 0.0                              # probability of a horizontal flip per patch
    colour_drop: float = 0.0                       # probability of keeping only one random channel per patch

    def __post_init__(self) -> None:
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))  # YAML gives a list
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"patch crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("flip", "colour_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"patch {name} is a probability, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.flip > 0 or self.colour_drop > 0


def crop_and_flip_patches(patches: torch.Tensor, crop_scale: tuple[float, float], flip: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """[M, C, P, P] -> [M, C, P, P]: each patch cropped to a random square of area fraction in ``crop_scale``
    at a random place, resized back to P x P (bilinear) and flipped with probability ``flip``, in one batched
    resampling. Area 1 and no flip is the identity (the sampling grid hits the pixel centres)."""
    m = patches.shape[0]
    uniform = lambda: torch.rand(m, generator=generator)  # noqa: E731
    low, high = crop_scale
    side = (low + (high - low) * uniform()).sqrt()  # side fraction of the kept square
    shift_x, shift_y = (2 * uniform() - 1) * (1 - side), (2 * uniform() - 1) * (1 - side)
    mirror = torch.where(uniform() < flip, -1.0, 1.0)
    theta = torch.zeros(m, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side * mirror, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = side, shift_y
    grid = F.affine_grid(theta, list(patches.shape), align_corners=False)
    return F.grid_sample(patches, grid, mode="bilinear", padding_mode="border", align_corners=False)


def drop_colours(patches: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[M, C, P, P] normalised patches: with ``probability`` per patch, keep one random channel, zero the rest."""
    m, channels = patches.shape[:2]
    kept = torch.randint(channels, (m,), generator=generator)
    mask = F.one_hot(kept, channels).to(patches.dtype)
    dropped = torch.rand(m, generator=generator) < probability
    mask[~dropped] = 1.0
    return patches * mask[:, :, None, None]


class PatchGridViews:
    """``(image, sample) -> {"patches": [Gh, Gw, C, patch, patch]}``, normalised, for CPC objectives."""

    def __init__(self, image_size: int, patch: int, stride: int, mean, std,
                 crop_scale: tuple[float, float] = (0.7, 1.0), flip: float = 0.5,
                 patch_augment: PatchAugmentConfig | None = None):
        steps: list = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=(1.0, 1.0), antialias=True)]
        if flip > 0:
            steps.append(T.RandomHorizontalFlip(flip))
        steps.append(T.ToTensor())
        self.transform = T.Compose(steps)
        self.patch, self.stride = patch, stride
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.patch_augment = patch_augment if patch_augment is not None and patch_augment.active else None

    def __call__(self, image, sample) -> dict:
        grid = grid_patches(self.transform(image)[None], self.patch, self.stride)[0]  # [Gh, Gw, C, P, P]
        patches = grid.reshape(-1, *grid.shape[2:])
        augment = self.patch_augment
        if augment is not None and (augment.crop_scale != (1.0, 1.0) or augment.flip > 0):
            patches = crop_and_flip_patches(patches, augment.crop_scale, augment.flip)
        patches = (patches - self.mean) / self.std
        if augment is not None and augment.colour_drop > 0:
            patches = drop_colours(patches, augment.colour_drop)
        return {"patches": patches.reshape(grid.shape).contiguous()}
