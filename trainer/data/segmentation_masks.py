"""Two crop views that carry an unsupervised segmentation of the whole image (DetCon, Hénaff et al. 2021).

``Segmentation`` (picklable) segments a decoded image with a classical, image-computable algorithm from
scikit-image: Felzenszwalb-Huttenlocher's graph segmentation (DetCon's "FH masks", scale 1000 and min size 1000
at ImageNet resolution in the authors' mask generation) or SLIC superpixels; it returns an [H, W] map of
region ids 0..K-1.

``SegmentationMaskViews`` is a view recipe (``CropGeometryViews`` plus masks): it segments the WHOLE image once,
then each view's random resized crop and horizontal flip is applied to the pixels and, with nearest resampling,
to the region-id map, so the same id names the same region in both views. Beside ``view0``/``view1`` (and the
crop geometry ``box*``/``flip*``) it returns ``mask0``/``mask1`` [size, size] int64 (the id of every view pixel)
and ``mask_ids`` [num_masks] int64: ids sampled among the regions present in BOTH views, without replacement
while there are enough and then repeated at random (the objective pools one vector per slot). Two crops that
share no region are redrawn up to ``attempts`` times; after that the second view reuses the first one's geometry.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .crop_geometry import CropGeometryViews, PhotometricConfig

SEGMENTATIONS = ("felzenszwalb", "slic")


@dataclass(frozen=True)
class Segmentation:
    """image (PIL or [H, W(, C)] array) -> [H, W] int64 region ids 0..K-1."""

    method: str = "felzenszwalb"   # felzenszwalb | slic
    scale: float = 1000.0          # felzenszwalb: larger -> larger regions
    sigma: float = 0.8             # felzenszwalb: Gaussian pre-smoothing
    min_size: int = 1000           # felzenszwalb: smallest region in pixels
    segments: int = 16             # slic: approximate number of superpixels
    compactness: float = 10.0      # slic: colour vs space balance (larger -> squarer superpixels)

    def __post_init__(self) -> None:
        if self.method not in SEGMENTATIONS:
            raise ValueError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, got {self.method!r}")
        if not self.scale > 0 or self.sigma < 0 or self.min_size < 1:
            raise ValueError(f"felzenszwalb needs scale > 0, sigma >= 0 and min_size >= 1, got scale={self.scale}, "
                             f"sigma={self.sigma}, min_size={self.min_size}")
        if self.segments < 1 or not self.compactness > 0:
            raise ValueError(f"slic needs segments >= 1 and compactness > 0, got segments={self.segments}, "
                             f"compactness={self.compactness}")
        if importlib.util.find_spec("skimage") is None:  # fail at build, not in the data workers
            raise ValueError("segmentation masks need scikit-image (the train extra: pip install '.[train]')")

    def __call__(self, image) -> np.ndarray:
        # Imported here: scikit-image is a training extra, loaded only by the data workers that segment.
        from skimage.segmentation import felzenszwalb, slic

        pixels = np.asarray(image)
        channel_axis = -1 if pixels.ndim == 3 else None
        if self.method == "felzenszwalb":
            labels = felzenszwalb(pixels, scale=self.scale, sigma=self.sigma, min_size=self.min_size,
                                  channel_axis=channel_axis)
        else:
            labels = slic(pixels, n_segments=self.segments, compactness=self.compactness, start_label=0,
                          channel_axis=channel_axis)
        return labels.astype(np.int64)


def crop_mask(labels: torch.Tensor, crop: tuple[int, int, int, int], flipped: bool, size: int) -> torch.Tensor:
    """The [size, size] region ids a view sees: ``labels`` [H, W] cropped at (top, left, height, width),
    resized with nearest resampling (pixel-centre aligned, as the image's own resize) and mirrored when
    ``flipped``: the geometry ``CropGeometryViews`` applies to the pixels."""
    top, left, height, width = crop
    mask = TF.resized_crop(labels[None], top, left, height, width, [size, size],
                           interpolation=InterpolationMode.NEAREST_EXACT)
    return (TF.hflip(mask) if flipped else mask)[0]


def sample_mask_ids(shared: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` ids from ``shared`` (non-empty, distinct): a random subset when there are enough, else all of
    them plus random repeats."""
    order = shared[torch.randperm(shared.numel())]
    if order.numel() >= count:
        return order[:count]
    return torch.cat([order, order[torch.randint(order.numel(), (count - order.numel(),))]])


class SegmentationMaskViews(CropGeometryViews):
    """``view0``/``view1`` [C, size, size], ``mask0``/``mask1`` [size, size] int64, ``mask_ids`` [num_masks]
    int64, ``box0``/``box1`` [4] and ``flip0``/``flip1`` [] (see the module docstring)."""

    def __init__(self, size: int, mean, std, segmentation: Segmentation, num_masks: int, crop_scale=(0.2, 1.0),
                 ratio=(3 / 4, 4 / 3), flip: float = 0.5, colour: PhotometricConfig | None = None, attempts: int = 10):
        super().__init__(size, mean, std, crop_scale, ratio, flip, colour)
        if num_masks < 1 or attempts < 1:
            raise ValueError(f"num_masks and attempts must be >= 1, got {num_masks} and {attempts}")
        self.segmentation = segmentation
        self.num_masks = num_masks
        self.attempts = attempts

    def __call__(self, image, sample) -> dict:
        labels = torch.from_numpy(self.segmentation(image))
        for _ in range(self.attempts):
            geometry = (self._geometry(image), self._geometry(image))
            masks = [crop_mask(labels, crop, flipped, self.size) for crop, flipped in geometry]
            shared = masks[0].unique()
            shared = shared[torch.isin(shared, masks[1].unique())]
            if shared.numel():
                break
        else:  # the crops never shared a region: one crop for both views (they still differ in colour)
            geometry = (geometry[0], geometry[0])
            masks = [masks[0], masks[0].clone()]
            shared = masks[0].unique()
        out = {"mask_ids": sample_mask_ids(shared, self.num_masks)}
        for index, (crop, flipped) in enumerate(geometry):
            out[f"view{index}"], out[f"box{index}"], out[f"flip{index}"] = self._view(image, crop, flipped)
            out[f"mask{index}"] = masks[index]
        return out


def segmentation_mask_views(size: int, mean, std, augment: dict, segmentation: Segmentation,
                            num_masks: int) -> SegmentationMaskViews:
    """The recipe from an objective's ``augment`` mapping (``crop_scale``, ``flip`` and the ``PhotometricConfig``
    fields, as ``crop_geometry_views``); unknown keys are errors."""
    augment = dict(augment)
    crop_scale, flip = augment.pop("crop_scale", (0.2, 1.0)), augment.pop("flip", 0.5)
    known = set(PhotometricConfig.__dataclass_fields__)
    if set(augment) - known:
        raise ValueError(f"augment: unknown key(s) {sorted(set(augment) - known)}; known: "
                         f"{sorted(known | {'crop_scale', 'flip'})}")
    return SegmentationMaskViews(size, mean, std, segmentation, num_masks, tuple(crop_scale), flip=flip,
                                 colour=PhotometricConfig(**augment))
