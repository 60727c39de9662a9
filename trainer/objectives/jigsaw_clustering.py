"""Jigsaw Clustering (Chen, Liu, Cheng, Chen, Cai & Jia 2021, "Jigsaw Clustering for Unsupervised Visual
Representation Learning", JigClu).

The data workers cut each image into m x m quadrant crops that overlap by ``cross_ratio`` of the side and
augment every crop on its own (random resized crop to image_size / m, colour jitter, grayscale, blur, flip), as
the authors' code does (``JigCluTransform``): patches of one image then share content but not colour
statistics, so clustering them is not solved by colour alone. In ``forward``, as batched tensor ops: the
N m^2 patches are shuffled across the whole batch and stitched into N montage images of the original size;
the encoder's spatial map of each montage (``feature_map``) is pooled into m x m parts, one per patch position,
and the parts are put back in source order. Two heads on each part's feature:

* clustering: an MLP projection + a contrastive loss where the m^2 - 1 other patches of the same source image are
  the positives and every other patch of the batch a negative (``trainer.losses.jigsaw_clustering``);
* location: a linear m^2-way classifier of the patch's position in its source image.

loss = clustering + ``location_weight`` x location. The exported model is the usual globally pooled backbone,
evaluated on whole images. ``patch_views: false`` instead augments the whole image once and cuts it into
patches in ``forward`` (cheaper, but the patches of an image share one colour jitter).

Choices: the map is pooled to m x m with adaptive average pooling (exact blocks when its side is a multiple
of m, as the 4x4 maps of cnn-small / resnet18-cifar at 32 px are; the paper's 7x7 ResNet map needs resampling
anyway); temperature 0.2; the montages are made from each process's own batch, so nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.views import AugmentConfig, OneView, augmentation
from trainer.losses.jigsaw_clustering import clustering_loss
from trainer.models import projection_mlp
from trainer.models.dense import feature_map, probe_shapes

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std


def split_patches(images: torch.Tensor, m: int) -> torch.Tensor:
    """[N, C, H, W] -> [N * m * m, C, H / m, W / m]: the patches of each image, row-major, image after image."""
    n, c, h, w = images.shape
    if h % m or w % m:
        raise ValueError(f"jigsaw_clustering: a {h}x{w} image does not split into {m}x{m} equal patches")
    patches = images.reshape(n, c, m, h // m, m, w // m).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n * m * m, c, h // m, w // m)


def join_patches(patches: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of ``split_patches``: [N * m * m, C, h, w] -> [N, C, m h, m w], consecutive groups of m^2 patches
    placed row-major."""
    count, c, h, w = patches.shape
    grid = patches.reshape(count // (m * m), m, m, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(count // (m * m), c, m * h, m * w)


def make_montages(images: torch.Tensor, m: int, order: torch.Tensor) -> torch.Tensor:
    """Montages whose k-th patch slot (k over all N m^2 slots, row-major within each montage) holds source patch
    ``order[k]`` (patch index = image * m^2 + position)."""
    return join_patches(split_patches(images, m)[order], m)


@dataclass
class JigsawClusteringOptions:
    grid: int = 2                   # m
    temperature: float = 0.2
    location_weight: float = 1.0
    projection_dim: int = 128
    projection_hidden_dim: int = 2048
    augment: dict = field(default_factory=dict)  # AugmentConfig fields of each patch's (or the one view's) recipe
    patch_views: bool = True        # augment every patch on its own (the authors' code); false: one view, then cut
    cross_ratio: float = 0.3        # overlap of neighbouring patch crops, as a fraction of the image side


class PatchViews:
    """(PIL image, sample) -> ``patches`` [m^2, C, S/m, S/m]: the m x m row-major quadrant crops of the image,
    each widened by ``cross_ratio`` x side into its neighbours and augmented on its own."""

    def __init__(self, size: int, grid: int, cross_ratio: float, mean, std, config: AugmentConfig):
        self.grid, self.cross_ratio = grid, cross_ratio
        self.transform = augmentation(size // grid, mean, std, config)

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The m^2 crop boxes (left, top, right, bottom), row-major."""
        def spans(side: int) -> list[tuple[int, int]]:
            m, c = self.grid, self.cross_ratio * side
            return [(max(0, round(i * side / m - c)), min(side, round((i + 1) * side / m + c))) for i in range(m)]

        return [(left, top, right, bottom) for top, bottom in spans(height) for left, right in spans(width)]

    def __call__(self, image, sample) -> dict:
        image = image.convert("RGB")
        return {"patches": torch.stack([self.transform(image.crop(box)) for box in self.boxes(*image.size)])}



@register
class JigsawClustering(Objective):
    key = "jigsaw_clustering"
    Options = JigsawClusteringOptions

    def __init__(self, spec: ObjectiveSpec, options: JigsawClusteringOptions):
        super().__init__(spec, options)
        m = options.grid
        if m < 2 or spec.image_size % m:
            raise ValueError(f"jigsaw_clustering: grid must be >= 2 and divide image_size {spec.image_size}, got {m}")
        if options.temperature <= 0 or options.location_weight < 0:
            raise ValueError("jigsaw_clustering: temperature must be > 0 and location_weight >= 0")
        if not 0 <= options.cross_ratio < 0.5:
            raise ValueError(f"jigsaw_clustering: cross_ratio must be in [0, 0.5), got {options.cross_ratio}")
        AugmentConfig(**options.augment)  # unknown augmentation fields fail at build
        width = probe_shapes(self.encoder.backbone, spec.image_size)[0][0]  # backbones without a map fail here
        self.projector = projection_mlp(width, options.projection_hidden_dim, options.projection_dim, 2)
        self.locator = nn.Linear(width, m * m)

    def views(self) -> PatchViews | OneView:
        config, o = self.encoder.config, self.options
        if o.patch_views:
            return PatchViews(config.image_size, o.grid, o.cross_ratio, config.mean, config.std, AugmentConfig(**o.augment))
        return OneView(config.image_size, config.mean, config.std, AugmentConfig(**o.augment))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m = self.options.grid
        # [N m^2, C, h, w], image after image, row-major: patch views arrive cut, a whole view is cut here
        patches = batch["patches"].flatten(0, 1) if "patches" in batch else split_patches(batch["image"], m)
        slots = patches.shape[0]
        order = torch.randperm(slots, device=patches.device)                      # slot k <- source patch order[k]
        montages = join_patches(patches[order], m)
        parts = F.adaptive_avg_pool2d(feature_map(self.encoder.backbone, montages), m)  # [N, C, m, m]
        parts = parts.flatten(2).transpose(1, 2).reshape(slots, -1)               # slot order
        features = parts[torch.argsort(order)]                                    # back to source-patch order
        patch = torch.arange(slots, device=patches.device)
        sources, positions = patch // (m * m), patch % (m * m)
        z = self.projector(features)
        clustering = clustering_loss(z, sources, self.options.temperature)
        location_logits = self.locator(features)
        location = F.cross_entropy(location_logits, positions)
        with torch.no_grad():
            location_accuracy = (location_logits.argmax(1) == positions).float().mean()
        return {"loss": clustering + self.options.location_weight * location, "clustering_loss": clustering.detach(),
                "location_loss": location.detach(), "location_accuracy": location_accuracy,
                "embedding_std": embedding_std(z)}
