"""CMC (Tian et al. 2019, "Contrastive Multiview Coding").

The views of an image are channel groups of a colour space: by default L vs ab of CIE Lab (the paper's
ImageNet/STL-10 setting), or any N >= 2 groups (e.g. Y, Cb, Cr -> 3 views). Each view has its own encoder
and its own projection head to a 128-d L2-normalised embedding. The exported model (``EmbeddingModel`` with a
``ViewSplitEncoder``) takes normalised RGB, converts the colour space in-graph and returns the concatenation
of the per-view encoder features, the representation the paper evaluates.

Pairings of the views (the paper's two ways to go beyond two views, section 3.3):
  * ``core``: view 0 is the core view, contrasted with every other view: L_C = sum_{j>0} L(V_0, V_j);
  * ``full``: every pair: L_F = sum_{i<j} L(V_i, V_j).
L(V_i, V_j) = L_{i->j} + L_{j->i} is symmetric: anchors from one view, the positive is the same image in the
other view, negatives are the other images in that other view (seed note 003's CMC formula).

Deviation from the paper, on purpose: the paper draws 16384 negatives from a memory bank and uses NCE; here the
negatives are the other images of the global batch, gathered across processes with gradient (InfoNCE per
direction by default, any ``loss`` of the InfoNCE family), so the run is stateless and two processes give the
loss and gradients of one process on the concatenated batch. Augmentation is one random resized crop + flip
per image with no colour jitter or grayscale: the colour split is itself the multiview transformation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.views import AugmentConfig, OneView
from trainer.distributed import gather_with_grad
from trainer.losses.nce_family import contrastive_loss
from trainer.models import ModelConfig, projection_mlp

from .base import Objective, ObjectiveSpec, default_model_config, register
from .options import InfoNCEOptions

PAIRINGS = ("core", "full")


@dataclass
class CMCOptions(InfoNCEOptions):
    temperature: float = 0.07  # the paper's tau
    projection_dim: int = 128  # per-view embedding width, as in the paper
    projection_layers: int = 1  # the paper's heads are one linear layer (fc -> 128 -> L2 norm)
    projection_hidden_dim: int = 512  # used only when projection_layers > 1
    colour_space: str = "lab"
    view_channels: list = field(default_factory=lambda: [[0], [1, 2]])  # L | ab
    pairing: str = "core"
    augment: dict = field(default_factory=dict)  # AugmentConfig fields, over NO_COLOUR_DISTORTION


# One view per image with no colour distortion: the colour split is the multiview (CMC's Lab pipeline).
NO_COLOUR_DISTORTION = {"jitter_prob": 0.0, "grayscale_prob": 0.0}


def view_pairs(num_views: int, pairing: str) -> list[tuple[int, int]]:
    """The (i, j) view pairs contrasted: core -> (0, j) for j >= 1; full -> every i < j."""
    if num_views < 2:
        raise ValueError(f"CMC needs at least 2 views, got {num_views}")
    if pairing == "core":
        return [(0, j) for j in range(1, num_views)]
    if pairing == "full":
        return [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
    raise ValueError(f"unknown pairing {pairing!r}; known: {', '.join(PAIRINGS)}")



@register
class CMC(Objective):
    key = "cmc"
    Options = CMCOptions

    def __init__(self, spec: ObjectiveSpec, options: CMCOptions):
        super().__init__(spec, options)
        self.pairs = view_pairs(len(options.view_channels), options.pairing)
        self.loss_options = options.loss_options()
        self.projectors = nn.ModuleList([
            projection_mlp(dim, options.projection_hidden_dim, options.projection_dim, options.projection_layers)
            for dim in self.encoder.backbone.feature_dims
        ])

    def model_config(self, spec: ObjectiveSpec, options: CMCOptions) -> ModelConfig:
        """One encoder per channel group of the colour space (``ViewSplitEncoder``), features concatenated."""
        return default_model_config(spec, colour_space=options.colour_space,
                                    view_channels=[list(g) for g in options.view_channels])

    def views(self) -> OneView:
        config = self.encoder.config
        return OneView(config.image_size, config.mean, config.std, AugmentConfig(**{**NO_COLOUR_DISTORTION, **self.options.augment}))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        features = self.encoder.backbone.forward_views(batch["image"])
        # The global batch: every process scores all N_global anchors against all N_global keys.
        z = [F.normalize(gather_with_grad(head(f)), dim=1) for head, f in zip(self.projectors, features)]
        out: dict[str, torch.Tensor] = {}
        total = z[0].new_zeros(())
        for i, j in self.pairs:
            pair = (self._directed(z[i], z[j]) + self._directed(z[j], z[i]))
            out[f"loss_{i}_{j}"] = pair.detach()
            total = total + pair
        out["loss"] = total
        return out

    def _directed(self, anchors: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """L_{i->j}: anchor n of view i against key n (positive) and the other keys of view j (negatives)."""
        return contrastive_loss(self.options.loss, anchors, keys, None, self.options.temperature, **self.loss_options)
