"""PixPro and PixContrast (Xie, Lin, Zhang, Cao, Lin & Hu 2021, "Propagate Yourself: Exploring Pixel-Level
Consistency for Unsupervised Visual Representation Learning").

Two random resized crops (+ flip) of each image keep their boxes (``trainer.data.crop_geometry``), so every cell
of a view's feature map has a known centre in the original image. A pair of cells, one per view, is positive
when their centres are closer than ``threshold`` (0.7) feature-cell diagonals (the larger view's). The online
side is backbone map -> pixel projection head (1x1-conv MLP: conv-BN-ReLU-conv); the target side is the
momentum copy of backbone + head, without gradient, with a cosine momentum schedule 0.99 -> 1.

* ``mode: pixpro`` (default): the online projection goes through the pixel-propagation module,
  y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j) over the cells j of the same view (gamma 2; g a 1x1 conv, its
  output L2-normalised as in the authors' code), and the loss is minus the cosine of y_i with the target cell
  x'_j over the positive pairs, in both directions (eq. 5).
* ``mode: pixcontrast``: no propagation; InfoNCE with temperature 0.3 where a query cell's positives are its
  geometric matches in the other view's target map and its negatives the other cells of that map (eq. 2;
  ``batch_negatives`` adds every other image's cells), both directions.
* ``instance_weight > 0`` adds the paper's instance branch ("PixPro + instance"): a second 1x1-conv head and
  a 1x1-conv predictor, average-pooled, BYOL's negative cosine against the other view's momentum head.

Implementation choices: the loss per direction averages the positive pairs of each image and then the images
that have any (the authors' code averages over all images, counting those without pairs as 0; the paper's
factor 2 is dropped); the pairs are per image, so nothing is gathered across processes. The exported model is
the usual globally pooled backbone, so kNN and export are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.crop_geometry import CropGeometryViews, crop_geometry_views, positive_pairs
from trainer.losses.dense import pixel_contrast, pixpro_consistency
from trainer.models import conv_mlp
from trainer.models.dense import cells, feature_map, probe_shapes

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy

MODES = ("pixpro", "pixcontrast")


@dataclass
class PixProOptions:
    mode: str = "pixpro"              # pixpro | pixcontrast
    threshold: float = 0.7            # positive when centre distance < threshold x cell diagonal
    projection_dim: int = 256
    projection_hidden_dim: int = 2048  # paper 4096
    gamma: float = 2.0                # sharpness of the propagation similarity
    transform_layers: int = 1         # g of the propagation module: 0 identity, 1 linear (paper), 2 MLP
    temperature: float = 0.3          # pixcontrast
    batch_negatives: bool = False     # pixcontrast: other images' cells are negatives too
    momentum: float = 0.99            # start of the cosine momentum schedule
    final_momentum: float = 1.0
    instance_weight: float = 0.0      # > 0: add the instance branch with this weight
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.2, 1.0), "flip": 0.5, "jitter_strength": 0.5,
                                                   "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.0})


@register
class PixPro(Objective):
    key = "pixpro"
    Options = PixProOptions

    def __init__(self, spec: ObjectiveSpec, options: PixProOptions):
        super().__init__(spec, options)
        if options.mode not in MODES:
            raise ValueError(f"pixpro: mode must be one of {MODES}, got {options.mode!r}")
        if options.transform_layers not in (0, 1, 2):
            raise ValueError(f"pixpro: transform_layers must be 0, 1 or 2, got {options.transform_layers}")
        if options.gamma <= 0 or options.temperature <= 0 or options.threshold <= 0 or options.instance_weight < 0:
            raise ValueError("pixpro: gamma, temperature and threshold must be > 0 and instance_weight >= 0")
        crop_geometry_views(spec.image_size, [0.0] * 3, [1.0] * 3, options.augment)  # bad augment keys fail at build
        width = probe_shapes(self.encoder.backbone, spec.image_size)[0][0]  # unsupported backbones fail here
        dim, hidden = options.projection_dim, options.projection_hidden_dim
        self.projector = conv_mlp(width, hidden, dim)  # PixPro's pixel projection head
        self.value_transform = {0: nn.Identity(), 1: nn.Conv2d(dim, dim, 1), 2: conv_mlp(dim, dim, dim)}[options.transform_layers]
        # Deep copies draw no random numbers: every process builds the same target network.
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)
        if options.instance_weight > 0:
            self.instance_projector = conv_mlp(width, hidden, dim)
            self.instance_predictor = conv_mlp(dim, hidden, dim)
            self.key_instance_projector = momentum_copy(self.instance_projector)

    def views(self) -> CropGeometryViews:
        config = self.encoder.config
        return crop_geometry_views(config.image_size, config.mean, config.std, self.options.augment)

    def propagate(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-propagation module: [N, C, h, w] -> [N, C, h, w], y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j)."""
        value = F.normalize(self.value_transform(x), dim=1).flatten(2)                  # [N, C, L]
        unit = F.normalize(x, dim=1).flatten(2)
        similarity = torch.bmm(unit.transpose(1, 2), unit).clamp_min(0) ** self.options.gamma  # [N, L, L]
        return torch.bmm(value, similarity.transpose(1, 2)).view_as(x)

    def _instance_loss(self, online_maps, target_maps) -> torch.Tensor:
        """BYOL-style instance branch: pooled predictor output vs the other view's pooled momentum head."""
        predictions = [self.instance_predictor(self.instance_projector(m)).mean(dim=(2, 3)) for m in online_maps]
        with torch.no_grad():
            targets = [self.key_instance_projector(m).mean(dim=(2, 3)) for m in target_maps]
        return -(F.cosine_similarity(predictions[0], targets[1]).mean() + F.cosine_similarity(predictions[1], targets[0]).mean())

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = (batch["view0"], batch["view1"])
        online_maps = [feature_map(self.encoder.backbone, x) for x in views]  # one pass per view (BN per view)
        online = [self.projector(m) for m in online_maps]
        with torch.no_grad():
            target_maps = [feature_map(self.key_encoder.backbone, x) for x in views]
            target = [self.key_projector(m) for m in target_maps]
        size = tuple(online[0].shape[-2:])
        pairs = positive_pairs(batch["box0"], batch["flip0"], batch["box1"], batch["flip1"], size, size,
                               self.options.threshold)                       # [N, L0, L1]
        pairs_back = pairs.transpose(1, 2)
        if self.options.mode == "pixpro":
            queries = [cells(self.propagate(p)) for p in online]
            loss = pixpro_consistency(queries[0], cells(target[1]), pairs) + pixpro_consistency(queries[1], cells(target[0]), pairs_back)
        else:
            queries = [cells(p) for p in online]
            tau, negatives = self.options.temperature, self.options.batch_negatives
            loss = (pixel_contrast(queries[0], cells(target[1]), pairs, tau, negatives)
                    + pixel_contrast(queries[1], cells(target[0]), pairs_back, tau, negatives))
        outputs = {"embedding_std": embedding_std(queries[0].reshape(-1, queries[0].shape[-1]))}
        if self.options.instance_weight > 0:
            instance = self._instance_loss(online_maps, target_maps)
            outputs["instance_loss"] = instance.detach()
            outputs["pixel_loss"] = loss.detach()
            loss = loss + self.options.instance_weight * instance
        counts = pairs.sum(dim=(1, 2))
        outputs.update(loss=loss, positive_pairs=counts.float().mean(), images_with_pairs=(counts > 0).float().mean())
        return outputs

    def after_step(self, step: int, total_steps: int) -> None:
        # After step s the next forward is iteration s + 1 (the schedule of BYOL / MoCo v3 / PixPro's code).
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.key_encoder, self.encoder, momentum)
        ema_update_(self.key_projector, self.projector, momentum)
        if self.options.instance_weight > 0:
            ema_update_(self.key_instance_projector, self.instance_projector, momentum)
