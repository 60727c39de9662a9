"""PaKA (Yeo, Jang & Kim 2025, "Patch-Level Kernel Alignment for Dense Self-Supervised Learning", arXiv
2509.05606).

A student and its EMA teacher see two crops of the image; the loss aligns the RELATIONAL structure of their
dense features instead of the features themselves: over the region both crops show, each network's patch
features give a linear kernel K = Z Z^T between patches, and the loss is 1 - CKA(K_student, K_teacher) per image
(``trainer.losses.paka.patch_kernel_alignment``; CKA centres the kernels with H = I - 11^T / N).

* Cross-view correspondence from the crop geometry (``trainer.data.crop_geometry``): the two crop boxes'
  intersection, in each view's own feature-map coordinates (a mirrored view's map is mirrored back first), is
  resampled by ROI-align onto one ``grid_size`` x ``grid_size`` grid, so token i of both sides is the same
  location of the original image. Images whose crops do not overlap are left out of the mean.
* Student: the online backbone on view0 (colour-augmented). Teacher: the momentum copy of the backbone (cosine
  schedule from ``momentum`` to 1) on view1, which by default is only cropped and flipped (the paper's
  augmentation-free teacher; ``teacher_augment: true`` jitters it as view0).

Implementation choices: the kernels are built on the backbone's dense features with no projection head (the loss
is invariant to the features' scale and rotation); one direction only (student on view0, teacher on view1).
The paper's Global-Local Intersection Maximisation crop sampling and its post-training from a pretrained encoder
are not reproduced: crops are two independent random resized crops and training starts from the run's encoder.
The loss is per image, so nothing is gathered across processes. The exported model is the plain backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.ops import roi_align

from trainer.data.crop_geometry import (
    CropGeometryViews,
    PhotometricConfig,
    crop_geometry_views,
)
from trainer.losses.paka import patch_kernel_alignment
from trainer.models.dense import cells, feature_map, probe_shapes

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import require_at_least, require_momentum_schedule


def overlap_rois(box_a: torch.Tensor, box_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The intersection of two crops in each crop's own normalised (unmirrored) coordinates.

    Args:
        box_a, box_b: [N, 4] crop boxes (x0, y0, x1, y1), original image coordinates normalised to [0, 1].
    Returns:
        (roi_a [N, 4], roi_b [N, 4], overlaps [N] bool): the intersection as (x0, y0, x1, y1) in [0, 1] of view a
        and of view b; where the boxes do not overlap the roi is the whole view and ``overlaps`` is False.
    """
    low = torch.maximum(box_a[:, :2], box_b[:, :2])
    high = torch.minimum(box_a[:, 2:], box_b[:, 2:])
    overlaps = (high > low).all(dim=1)

    def relative(box: torch.Tensor) -> torch.Tensor:
        origin, extent = box[:, :2], (box[:, 2:] - box[:, :2]).clamp_min(1e-12)
        roi = torch.cat([(low - origin) / extent, (high - origin) / extent], dim=1)
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=roi.dtype, device=roi.device)
        return torch.where(overlaps[:, None], roi, whole)

    return relative(box_a), relative(box_b), overlaps


def roi_tokens(maps: torch.Tensor, flips: torch.Tensor, rois: torch.Tensor, grid: int) -> torch.Tensor:
    """[N, grid * grid, C] float32: ROI-align of each map over its roi (view-normalised, unmirrored coordinates) onto a
    grid x grid grid (row-major); a mirrored view's map [N, C, h, w] is mirrored back first."""
    # float32: the rois carry the image index, which half precision cannot hold exactly beyond 256 (bfloat16).
    maps = maps.float()
    maps = torch.where(flips.view(-1, 1, 1, 1) > 0.5, maps.flip(-1), maps)
    h, w = maps.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=maps.dtype, device=maps.device)
    index = torch.arange(maps.shape[0], dtype=maps.dtype, device=maps.device)[:, None]
    boxes = torch.cat([index, rois.to(maps.dtype) * scale], dim=1)
    # aligned: a cell's centre is at c + 0.5 in these coordinates, the crop_geometry convention.
    return cells(roi_align(maps, boxes, output_size=(grid, grid), spatial_scale=1.0, aligned=True))


class PlainTeacherViews:
    """A crop-geometry view recipe whose view0 (the student's) comes from ``student`` and whose view1 (the
    teacher's) is drawn with the same crop and flip distribution but only resized and normalised."""

    def __init__(self, student: CropGeometryViews, mean, std):
        self.student = student
        self.teacher = CropGeometryViews(student.size, mean, std, student.scale, student.ratio, student.flip,
                                         colour=PhotometricConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0))

    def __call__(self, image, sample) -> dict:
        out = {}
        for index, views in enumerate((self.student, self.teacher)):
            crop, flipped = views._geometry(image)
            out[f"view{index}"], out[f"box{index}"], out[f"flip{index}"] = views._view(image, crop, flipped)
        return out


@dataclass
class PaKAOptions:
    grid_size: int = 7                 # the common grid the overlap is resampled to (7 x 7 tokens)
    momentum: float = 0.99             # teacher EMA momentum at the start of the cosine schedule
    final_momentum: float = 1.0        # its end
    teacher_augment: bool = False      # False: the paper's augmentation-free teacher (view1 cropped and flipped only)
    # view0's augmentation (crop_scale, flip and PhotometricConfig fields); view1 shares its crop and flip.
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.25, 1.0), "flip": 0.5, "jitter_strength": 0.5,
                                                   "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.0})

    def __post_init__(self) -> None:
        require_at_least(self, 1, "grid_size")
        if self.grid_size * self.grid_size < 2:
            raise ValueError(f"grid_size must give at least 2 tokens for a kernel, got {self.grid_size}")
        require_momentum_schedule(self)
        crop_geometry_views(8, [0.0] * 3, [1.0] * 3, self.augment)  # unknown augment keys fail here


@register
class PaKA(Objective):
    key = "paka"
    Options = PaKAOptions

    def __init__(self, spec: ObjectiveSpec, options: PaKAOptions):
        super().__init__(spec, options)
        probe_shapes(self.encoder.backbone, spec.image_size)  # backbones without a feature map fail here
        # A deep copy draws no random numbers: every process builds the same teacher.
        self.teacher = momentum_copy(self.encoder)

    def views(self):
        config = self.encoder.config
        views = crop_geometry_views(config.image_size, config.mean, config.std, self.options.augment)
        return views if self.options.teacher_augment else PlainTeacherViews(views, config.mean, config.std)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        student_map = feature_map(self.encoder.backbone, batch["view0"])
        with torch.no_grad():
            teacher_map = feature_map(self.teacher.backbone, batch["view1"])
        roi_student, roi_teacher, overlaps = overlap_rois(batch["box0"], batch["box1"])
        grid = self.options.grid_size
        student = roi_tokens(student_map, batch["flip0"], roi_student, grid)
        teacher = roi_tokens(teacher_map, batch["flip1"], roi_teacher, grid)
        ignored = ~overlaps[:, None].expand(-1, grid * grid)
        loss = patch_kernel_alignment(student, teacher, ignored)
        return {"loss": loss, "embedding_std": embedding_std(student_map.mean(dim=(2, 3))),
                "overlapping_views": overlaps.float().mean()}

    def after_step(self, step: int, total_steps: int) -> None:
        # After step s the next forward is iteration s + 1.
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.teacher, self.encoder, momentum)
