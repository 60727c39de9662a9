"""Two views that keep their crop geometry, and the cell correspondences that geometry implies (PixPro,
PatchNCE).

``CropGeometryViews`` is a view recipe: each view is a random resized crop (+ horizontal flip) of the image,
then photometric jitter, and beside the pixels it returns where the crop came from:
``box0``/``box1`` = (x0, y0, x1, y1) in original-image coordinates normalised to [0, 1] (x by the width, y by
the height) and ``flip0``/``flip1`` (1.0 when the crop was mirrored). With ``shared_geometry`` both views use
one crop and flip and differ only photometrically (PatchNCE's "same location" is then exact, cell for cell).

The geometry functions are pure tensor maths on batches of boxes:
* ``cell_centres(boxes, flips, h, w)``: the centre of every cell of an h x w feature map of each view, in
  original normalised coordinates (cell (r, c) covers view pixels [c/w, (c+1)/w] x [r/h, (r+1)/h]; a
  flipped view's column c sits at 1 - (c + 0.5)/w of its box).
* ``cell_distances(...)``: distances between the cells of two views divided by the larger of the two views'
  feature-cell diagonals (PixPro sec. 3.1: "normalized to the diagonal length of a feature map bin to account
  for the scale differences between the augmentation views", as in the authors' code).
* ``positive_pairs(...)``: those distances below a threshold (0.7 in PixPro): the positive cell pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

PIXPRO_THRESHOLD = 0.7


@dataclass
class PhotometricConfig:
    """The colour part of SimCLR/BYOL augmentation (geometry is the recipe's own), blur off at 32 px."""

    jitter_strength: float = 0.5  # s: brightness/contrast/saturation 0.8 s, hue 0.2 s
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0


def photometric(size: int, mean, std, config: PhotometricConfig) -> T.Compose:
    s = config.jitter_strength
    steps: list = []
    if config.jitter_prob > 0 and s > 0:
        steps.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=config.jitter_prob))
    if config.grayscale_prob > 0:
        steps.append(T.RandomGrayscale(config.grayscale_prob))
    if config.blur_prob > 0:
        kernel = max(3, (size // 10) | 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=config.blur_prob))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


class CropGeometryViews:
    """``view0``/``view1`` [C, size, size] with ``box0``/``box1`` [4] and ``flip0``/``flip1`` [] float tensors."""

    def __init__(self, size: int, mean, std, crop_scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5,
                 colour: PhotometricConfig | None = None, shared_geometry: bool = False):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip}")
        self.size = size
        self.scale = tuple(float(v) for v in crop_scale)
        self.ratio = tuple(float(v) for v in ratio)
        self.flip = flip
        self.shared_geometry = shared_geometry
        self.colour = photometric(size, mean, std, colour or PhotometricConfig())

    def _geometry(self, image) -> tuple[tuple[int, int, int, int], bool]:
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return (top, left, height, width), bool(torch.rand(()) < self.flip)

    def _view(self, image, crop, flipped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        top, left, height, width = crop
        view = TF.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        if flipped:
            view = TF.hflip(view)
        image_width, image_height = image.size
        box = torch.tensor([left / image_width, top / image_height,
                            (left + width) / image_width, (top + height) / image_height], dtype=torch.float32)
        return self.colour(view), box, torch.tensor(float(flipped))

    def __call__(self, image, sample) -> dict:
        first = self._geometry(image)
        second = first if self.shared_geometry else self._geometry(image)
        out = {}
        for index, (crop, flipped) in enumerate((first, second)):
            out[f"view{index}"], out[f"box{index}"], out[f"flip{index}"] = self._view(image, crop, flipped)
        return out


def crop_geometry_views(size: int, mean, std, augment: dict, shared_geometry: bool = False) -> CropGeometryViews:
    """The recipe from an objective's ``augment`` mapping: ``crop_scale``, ``flip`` and the ``PhotometricConfig``
    fields; unknown keys are errors."""
    augment = dict(augment)
    crop_scale, flip = augment.pop("crop_scale", (0.2, 1.0)), augment.pop("flip", 0.5)
    known = set(PhotometricConfig.__dataclass_fields__)
    if set(augment) - known:
        raise ValueError(f"augment: unknown key(s) {sorted(set(augment) - known)}; known: "
                         f"{sorted(known | {'crop_scale', 'flip'})}")
    return CropGeometryViews(size, mean, std, tuple(crop_scale), flip=flip, colour=PhotometricConfig(**augment),
                             shared_geometry=shared_geometry)


def cell_centres(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centres [N, height*width, 2] (x, y; row-major cells) in original normalised coordinates.

    Args:
        boxes: [N, 4] crop boxes (x0, y0, x1, y1), original coordinates normalised to [0, 1].
        flips: [N] 1 where the view was mirrored after cropping, else 0.
        height, width: the feature map's size.
    """
    u = (torch.arange(width, dtype=boxes.dtype, device=boxes.device) + 0.5) / width   # view-normalised x
    v = (torch.arange(height, dtype=boxes.dtype, device=boxes.device) + 0.5) / height
    u = torch.where(flips.view(-1, 1) > 0.5, 1.0 - u, u)  # [N, w]: a mirrored view's column c is 1 - u_c
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    x = x0[:, None] + u * (x1 - x0)[:, None]          # [N, w]
    y = y0[:, None] + v[None] * (y1 - y0)[:, None]    # [N, h]
    grid_x = x[:, None, :].expand(-1, height, -1)
    grid_y = y[:, :, None].expand(-1, -1, width)
    return torch.stack([grid_x, grid_y], dim=-1).reshape(boxes.shape[0], height * width, 2)


def cell_diagonals(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N]: the diagonal of one feature-map cell of each view, in original normalised coordinates."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    return torch.sqrt(((x1 - x0) / width) ** 2 + ((y1 - y0) / height) ** 2)


def cell_distances(box_a: torch.Tensor, flip_a: torch.Tensor, box_b: torch.Tensor, flip_b: torch.Tensor,
                   size_a: tuple[int, int], size_b: tuple[int, int]) -> torch.Tensor:
    """[N, La, Lb]: centre distances of view a's and view b's cells over the larger cell diagonal."""
    centres_a = cell_centres(box_a, flip_a, *size_a)
    centres_b = cell_centres(box_b, flip_b, *size_b)
    diagonal = torch.maximum(cell_diagonals(box_a, *size_a), cell_diagonals(box_b, *size_b))
    # Explicit differences, not cdist: its matrix-product shortcut is inexact near the threshold.
    distances = (centres_a[:, :, None, :] - centres_b[:, None, :, :]).norm(dim=-1)
    return distances / diagonal.clamp_min(1e-12)[:, None, None]


def positive_pairs(box_a: torch.Tensor, flip_a: torch.Tensor, box_b: torch.Tensor, flip_b: torch.Tensor,
                   size_a: tuple[int, int], size_b: tuple[int, int], threshold: float = PIXPRO_THRESHOLD) -> torch.Tensor:
    """[N, La, Lb] bool: cell pairs whose normalised centre distance is below ``threshold`` (PixPro's T)."""
    if not threshold > 0 or math.isinf(threshold):
        raise ValueError(f"the positive-pair distance threshold must be a positive number, got {threshold}")
    return cell_distances(box_a, flip_a, box_b, flip_b, size_a, size_b) < threshold
