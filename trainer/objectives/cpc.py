"""CPC (van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding").

The image is a grid of overlapping patches (the paper: 64 px patches at stride 32 of a 256 px image, a 7 x 7
grid; here 8 px at stride 4 of a 32 px image, the same 7 x 7 grid), cut in the data workers
(``trainer.data.patches``). The run's backbone encodes every patch on its own into z_{i,j}; a PixelCNN-style
context network (residual blocks of 1x1, 1x3 and a 2x1 convolution over the row above and the row itself, so
row i sees rows <= i only: a masked convolution) gives c_{i,j}; a linear map W_k per step predicts
zhat_{i+k,j} = W_k c_{i,j} for k = 1..K rows below (the paper: up to five rows), and ``cpc_loss`` scores each
prediction against every patch of the global batch (gathered across processes): the true z_{i+k,j} is the
positive, other positions of the image and all patches of the other images are the negatives.

The exported encoder is the patch encoder over the same grid, mean-pooled (``ModelConfig.patch_grid``), the
representation CPC evaluates; the context network and the W_k are training-only. ``target_dim`` and
``prediction_scale`` add CPC v2's target projection and prediction scaling (Algorithm 1 of Hénaff et al.);
``layer_norm`` swaps the backbone's batch norm for layer norm (``ModelConfig.backbone_norm``). ``cpc2``
(``trainer/objectives/cpc2.py``) builds on this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.data.patches import PatchGridViews
from trainer.distributed import gather_with_grad
from trainer.losses.cpc import cpc_loss
from trainer.models import ModelConfig, RowPredictor

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std

DIRECTIONS = ("down", "up", "right", "left")  # where the predicted rows lie relative to the context


@dataclass
class CPCOptions:
    patch: int = 8                   # patch side in px (the paper: 64 of 256)
    stride: int = 4                  # 50% overlap, as the paper's 32 px of 64
    prediction_steps: int = 5        # K: predict up to K rows ahead
    skip_steps: int = 0              # predict k = skip_steps + 1 .. K (CPC v2's code skips overlapping rows)
    context_layers: int = 5          # residual blocks of the PixelCNN-style context network
    context_hidden_dim: int = 256    # their bottleneck width
    target_dim: int | None = None    # None: predict z itself; an int: a linear projection of z (CPC v2)
    prediction_scale: float = 1.0    # predictions are multiplied by this before scoring (CPC v2: 0.1)
    layer_norm: bool = False         # backbone BatchNorm2d -> GroupNorm(1, C) (CPC v2)
    crop_scale: tuple[float, float] = (0.7, 1.0)  # image-level random crop (the paper: 256 of 300 px)
    flip: float = 0.5                # image-level horizontal flip
    directions: list[str] = field(default_factory=lambda: ["down"])  # prediction directions, each its own network


def orient(grid: torch.Tensor, direction: str) -> torch.Tensor:
    """[N, H, W, D] -> the grid turned so that ``direction`` points down the rows: "down" as is, "up" rows
    reversed, "right" transposed (columns become rows), "left" transposed and reversed."""
    if direction == "down":
        return grid
    if direction == "up":
        return grid.flip(1)
    if direction == "right":
        return grid.transpose(1, 2)
    if direction == "left":
        return grid.transpose(1, 2).flip(1)
    raise ValueError(f"unknown direction {direction!r}; known: {list(DIRECTIONS)}")


@register
class CPC(Objective):
    key = "cpc"
    Options = CPCOptions

    def __init__(self, spec: ObjectiveSpec, options: CPCOptions):
        super().__init__(spec, options)
        size = (spec.image_size - options.patch) // options.stride + 1
        if not 0 <= options.skip_steps < options.prediction_steps < size:
            raise ValueError(f"{self.key}: need 0 <= skip_steps < prediction_steps < grid size {size} "
                             f"(patch {options.patch}, stride {options.stride} at {spec.image_size} px), got "
                             f"skip_steps {options.skip_steps}, prediction_steps {options.prediction_steps}")
        if not options.directions or any(d not in DIRECTIONS for d in options.directions) \
                or len(set(options.directions)) != len(options.directions):
            raise ValueError(f"{self.key}: directions must be distinct names from {list(DIRECTIONS)}, "
                             f"got {options.directions}")
        if options.context_layers < 1 or options.prediction_scale <= 0:
            raise ValueError(f"{self.key}: need context_layers >= 1 and prediction_scale > 0")
        dim = self.encoder.feature_dim
        target_dim = options.target_dim or dim
        self.target_projection = nn.Linear(dim, target_dim) if options.target_dim else nn.Identity()
        steps = list(range(options.skip_steps + 1, options.prediction_steps + 1))
        self.predictors = nn.ModuleDict({
            direction: RowPredictor(dim, options.context_hidden_dim, options.context_layers, target_dim, steps)
            for direction in options.directions
        })

    def model_config(self, spec: ObjectiveSpec, options: CPCOptions) -> ModelConfig:
        """The patch encoder over the grid, mean-pooled (``patch_grid``); layer norm replaces batch norm if asked."""
        return default_model_config(spec, patch_grid={"patch": options.patch, "stride": options.stride},
                                    backbone_norm="layer" if options.layer_norm else None)

    def views(self) -> PatchGridViews:
        config, options = self.encoder.config, self.options
        return PatchGridViews(config.image_size, options.patch, options.stride, config.mean, config.std,
                              options.crop_scale, options.flip)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z = self.encoder.backbone.encode_grid(batch["patches"])  # [n, G, G, D]
        targets = gather_with_grad(self.target_projection(z))  # the global batch's patches: positives and negatives
        scale = self.options.prediction_scale
        losses = {}
        for direction, predictor in self.predictors.items():
            predictions = {k: gather_with_grad(p * scale) for k, p in predictor(orient(z, direction)).items()}
            losses[direction] = cpc_loss(predictions, orient(targets, direction))
        outputs = {"loss": torch.stack(list(losses.values())).mean(),
                   "embedding_std": embedding_std(targets.flatten(0, 2))}
        if len(losses) > 1:
            outputs.update({f"loss_{direction}": loss.detach() for direction, loss in losses.items()})
        return outputs
