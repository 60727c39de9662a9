"""DetCon_S and DetCon_B (Hénaff, Koppula, Alayrac, van den Oord, Vinyals & Carreira 2021, "Efficient Visual
Pretraining with Contrastive Detection").

What the paper adds to SimCLR / BYOL: an unsupervised segmentation of each whole image (Felzenszwalb-
Huttenlocher by default, or SLIC: ``segmentation``), carried through both views' crop and flip so the same mask id
names the same region in both (``trainer.data.segmentation_masks``); ``num_masks`` mask ids per image (16 in the
paper) are sampled, the backbone's feature map is mask-pooled into one hidden vector per mask (``mask_pool``), each
goes through the projection MLP, and the contrastive detection loss (``trainer.losses.detcon.detcon_loss``,
temperature 0.1) pulls the two views' vectors of the same mask together and pushes apart the other masks of the
same image and of every other image in the global batch (both views' vectors are negatives, as in the
authors' code).

* ``detcon_s``: SimCLR's architecture: online backbone + projector for both views; the pooled projections are
  the queries and the keys.
* ``detcon_b``: BYOL's architecture: online backbone + projector + predictor, and a target network (EMA of
  backbone + projector, cosine momentum 0.996 -> 1); the predictions are the queries, the target projections the
  keys, with the same contrastive loss (the paper's DetCon_B keeps negatives). ``loss: regression`` swaps in BYOL's
  2 - 2 cos between a mask's prediction and the other view's target of the same mask (no negatives).

Implementation choices: the mask ids are sampled once per image among the regions present in both views (the
authors' code samples each view's ids apart, so some slots have no positive); a mask is pooled with its area
fraction in each feature cell as the weight (the authors' code gives each cell to its majority mask, which at
a CIFAR 4x4 map drops most masks). Both views' slots are gathered across processes with their gradient, so every
process computes the loss of the global batch (2 processes equal 1 with global batch norm). BYOL's asymmetric
blur / solarize are replaced by one ``PhotometricConfig`` for both views (jitter, grayscale, blur; no solarize).
The exported model is the plain backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.segmentation_masks import (
    SEGMENTATIONS,
    Segmentation,
    SegmentationMaskViews,
    segmentation_mask_views,
)
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.detcon import detcon_loss, detcon_regression
from trainer.models import projection_mlp
from trainer.models.dense import feature_map, probe_shapes

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import as_number, require_at_least, require_momentum_schedule, require_positive

B_LOSSES = ("contrastive", "regression")


def mask_pool(features: torch.Tensor, masks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One vector per mask slot: the mean of the feature cells under mask ``ids[n, m]``, each cell weighted by the
    fraction of its area the mask covers.

    Args:
        features: [N, C, h, w] feature maps.
        masks: [N, H, W] int region ids of each view pixel (H, W: the image's size; h, w when already pooled).
        ids: [N, M] int mask id of each slot.
    Returns:
        [N, M, C]; a slot whose id is absent from the view is all zeros.
    """
    shapes_ok = features.dim() == 4 and masks.dim() == 3 and ids.dim() == 2
    if not shapes_ok or not features.shape[0] == masks.shape[0] == ids.shape[0]:
        raise ValueError(f"mask_pool takes features [N, C, h, w], masks [N, H, W] and ids [N, M], got "
                         f"{tuple(features.shape)}, {tuple(masks.shape)} and {tuple(ids.shape)}")
    weights = (masks[:, None] == ids[:, :, None, None]).to(features.dtype)              # [N, M, H, W]
    if weights.shape[-2:] != features.shape[-2:]:
        weights = F.adaptive_avg_pool2d(weights, features.shape[-2:])                   # area fractions per cell
    area = weights.sum(dim=(2, 3))
    return torch.einsum("nmhw,nchw->nmc", weights, features) / area.clamp_min(1e-6)[..., None]


@dataclass
class DetConSOptions:
    temperature: float = 0.1           # tau of the contrastive detection loss
    num_masks: int = 16                # mask slots per image (the paper samples 16)
    segmentation: str = "felzenszwalb"  # felzenszwalb | slic
    fh_scale: float = 1000.0           # felzenszwalb scale (authors' masks: 1000 at ImageNet resolution)
    fh_sigma: float = 0.8              # felzenszwalb pre-smoothing (scikit-image's default, as the authors')
    fh_min_size: int = 1000            # felzenszwalb smallest region in pixels (authors' masks: 1000)
    slic_segments: int = 16            # slic: approximate superpixel count (not in the paper)
    slic_compactness: float = 10.0     # slic: colour vs space (scikit-image's default)
    projection_dim: int = 256          # projector output
    projection_hidden_dim: int = 4096  # projector hidden width
    # BYOL's augmentation: crop 0.08-1, flip, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2; one blur
    # probability for both views (paper: 1.0 and 0.1).
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.08, 1.0), "flip": 0.5, "jitter_strength": 0.5,
                                                   "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.5})

    def __post_init__(self) -> None:
        require_positive(self, "temperature")
        if self.segmentation not in SEGMENTATIONS:
            raise ValueError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, got {self.segmentation!r}")
        for name in ("fh_scale", "fh_sigma", "slic_compactness"):
            as_number(self, name)
        require_at_least(self, 1, "num_masks", "fh_min_size", "slic_segments", "projection_dim",
                         "projection_hidden_dim")
        # Bad segmentation parameters and augment keys fail here, not in the data workers.
        segmentation_mask_views(8, [0.0] * 3, [1.0] * 3, self.augment, self.segmenter(), self.num_masks)

    def segmenter(self) -> Segmentation:
        return Segmentation(self.segmentation, self.fh_scale, self.fh_sigma, self.fh_min_size, self.slic_segments,
                            self.slic_compactness)


@register
class DetConS(Objective):
    key = "detcon_s"
    Options = DetConSOptions

    def __init__(self, spec: ObjectiveSpec, options: DetConSOptions):
        super().__init__(spec, options)
        width = probe_shapes(self.encoder.backbone, spec.image_size)[0][0]  # unsupported backbones fail here
        self.projector = projection_mlp(width, options.projection_hidden_dim, options.projection_dim, 2)

    def views(self) -> SegmentationMaskViews:
        config, options = self.encoder.config, self.options
        return segmentation_mask_views(config.image_size, config.mean, config.std, options.augment,
                                       options.segmenter(), options.num_masks)

    @staticmethod
    def project_masks(encoder, projector, images: torch.Tensor, masks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, M, D]: the projector applied to each slot's mask-pooled backbone vector (batch norm over all N M)."""
        pooled = mask_pool(feature_map(encoder.backbone, images), masks, ids)
        return projector(pooled.flatten(0, 1)).view(ids.shape[0], ids.shape[1], -1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ids = batch["mask_ids"]
        z0, z1 = (self.project_masks(self.encoder, self.projector, batch[f"view{i}"], batch[f"mask{i}"], ids)
                  for i in (0, 1))
        all_ids = gather_no_grad(ids)
        q0, q1 = gather_with_grad(z0), gather_with_grad(z1)
        loss = detcon_loss(q0, q1, q0, q1, all_ids, all_ids, self.options.temperature)
        return {"loss": loss, **_mask_metrics(z0, ids)}


def _mask_metrics(z: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse of the per-mask projections, and the distinct masks per image actually sampled."""
    distinct = (ids[:, :, None] == ids[:, None, :]).float().sum(dim=2).reciprocal().sum(dim=1).mean()
    return {"embedding_std": embedding_std(z.flatten(0, 1)), "masks_per_image": distinct}


@dataclass
class DetConBOptions(DetConSOptions):
    momentum: float = 0.996            # tau_base of BYOL's cosine schedule
    final_momentum: float = 1.0        # its end
    predictor_hidden_dim: int = 4096   # predictor hidden width
    loss: str = "contrastive"          # contrastive (the paper) | regression (BYOL's 2 - 2 cos per mask)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_momentum_schedule(self)
        require_at_least(self, 1, "predictor_hidden_dim")
        if self.loss not in B_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(B_LOSSES)}, got {self.loss!r}")


@register
class DetConB(DetConS):
    key = "detcon_b"
    Options = DetConBOptions

    def __init__(self, spec: ObjectiveSpec, options: DetConBOptions):
        super().__init__(spec, options)
        dim = options.projection_dim
        self.predictor = projection_mlp(dim, options.predictor_hidden_dim, dim, 2)
        # Deep copies draw no random numbers: every process builds the same target network.
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ids = batch["mask_ids"]
        with torch.no_grad():  # targets first: their activations are freed before the online graph is built
            t0, t1 = (gather_no_grad(self.project_masks(self.target_encoder, self.target_projector, batch[f"view{i}"],
                                                        batch[f"mask{i}"], ids)) for i in (0, 1))
        z0, z1 = (self.project_masks(self.encoder, self.projector, batch[f"view{i}"], batch[f"mask{i}"], ids)
                  for i in (0, 1))
        p0, p1 = (gather_with_grad(self.predictor(z.flatten(0, 1)).view_as(z)) for z in (z0, z1))
        all_ids = gather_no_grad(ids)
        if self.options.loss == "contrastive":
            loss = detcon_loss(p0, p1, t0, t1, all_ids, all_ids, self.options.temperature)
        else:
            loss = detcon_regression(p0, p1, t0, t1, all_ids, all_ids)
        return {"loss": loss, **_mask_metrics(z0, ids)}

    def after_step(self, step: int, total_steps: int) -> None:
        # After step s the next forward is iteration s + 1 (BYOL's schedule).
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)
