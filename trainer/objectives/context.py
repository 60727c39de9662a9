"""Context prediction (Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation Learning by Context
Prediction").

The data workers lay a 3x3 grid of tiles with a gap and a random jitter per tile over a random crop of each
image (``ContextPairView``: one batched gather for the nine tiles) and keep the centre tile and one of its 8
neighbours, uniformly at random, with the neighbour's position (0..7) as the label. A siamese network (the run's
backbone, shared by both patches; one pass over the 2N patches) encodes the pair, the two features are
concatenated (centre first) and an MLP (the paper's fc6 per patch, then fc7 and fc8 on the pair) classifies the
position: 8-way softmax cross-entropy. The exported encoder is the backbone, evaluated on whole images.

Implementation choices at CIFAR scale: the 32 px image is rescaled to 96 px and cut into 22 px tiles 11 px
apart, jittered by up to 3 px (the paper: 96 px patches, 48 px gap, up to 7 px jitter: gap = tile / 2 is kept).
``colour_drop`` (off by default) keeps one random channel per patch, the paper's counter to chromatic aberration
(it drops two channels and fills them with noise). ViT backbones (fixed input size) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.pretext_inputs import NEIGHBOUR_POSITIONS, ContextPairView
from trainer.losses.pretext import pretext_accuracy, pretext_classification_loss
from trainer.models import linear_bn_relu, projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .jigsaw import refuse_fixed_size_backbone
from .options import require_at_least


@dataclass
class ContextOptions:
    puzzle_size: int = 96        # the crop is rescaled to this before cutting
    tile: int = 22               # patch side in px (the paper: 96)
    gap: int = 11                # px between neighbouring patches before jitter (the paper: 48, half a patch)
    jitter: int = 3              # random shift of each patch, +- px per axis (the paper: up to 7)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    colour_drop: float = 0.0     # probability per patch of keeping one random colour channel only
    patch_dim: int = 256         # per-patch layer (fc6) width
    head_hidden_dim: int = 512   # fc7 width

    def __post_init__(self) -> None:
        if not 0 <= self.colour_drop <= 1:
            raise ValueError(f"context: colour_drop is a probability, got {self.colour_drop}")
        require_at_least(self, 1, "patch_dim", "head_hidden_dim")


@register
class Context(Objective):
    key = "context"
    Options = ContextOptions

    def __init__(self, spec: ObjectiveSpec, options: ContextOptions):
        super().__init__(spec, options)
        refuse_fixed_size_backbone(self.encoder, self.key)
        self.views()  # geometry errors at build time
        self.patch_head = linear_bn_relu(self.encoder.embed_dim, options.patch_dim)  # fc6, per patch
        # fc7 (Linear-BN-ReLU) and fc8 on the concatenated pair
        self.classifier = projection_mlp(2 * options.patch_dim, options.head_hidden_dim, len(NEIGHBOUR_POSITIONS))

    def views(self) -> ContextPairView:
        o, config = self.options, self.encoder.config
        return ContextPairView(o.puzzle_size, o.tile, o.gap, o.jitter, config.mean, config.std, o.crop_scale, o.colour_drop)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        n = batch["centre"].shape[0]
        features = self.encoder.encode_image(torch.cat([batch["centre"], batch["neighbour"]]))  # shared, one pass
        centre, neighbour = self.patch_head(features).split(n)
        logits = self.classifier(torch.cat([centre, neighbour], dim=1))
        labels = batch["position"]
        return {"loss": pretext_classification_loss(logits, labels), "accuracy": pretext_accuracy(logits, labels),
                "embedding_std": embedding_std(features)}
