"""RotNet (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image Rotations").

Every image of the batch is shown at all four rotations, 0/90/180/270 degrees (``rotate_batch``: one
``torch.rot90`` per angle over the whole batch, so the four copies of an image share a batch and its batch-norm
statistics, as the paper found best), and a classifier on the encoder's features predicts which rotation it
sees: 4-way softmax cross-entropy. The classifier (an MLP, or linear with ``head_hidden_dim: 0``) is training
only; the exported encoder is the backbone.

Self-contained for composition (``multitask``): the view recipe gives ``{"image": [C, S, S]}`` and ``forward``
needs only ``batch["image"]``. Implementation choices: the paper trains a NIN/ResNet whose later blocks act
as the classifier; here the run's backbone is followed by a small MLP head. Light augmentation (random crop
and flip, as the paper's CIFAR runs); no colour jitter, which rotation does not need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.pretext_inputs import RotationView, rotate_batch
from trainer.data.views import view_configs
from trainer.losses.pretext import pretext_accuracy, pretext_classification_loss
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std


@dataclass
class RotationOptions:
    head_hidden_dim: int = 512   # hidden width of the rotation classifier; 0: a linear classifier
    augment: dict = field(default_factory=lambda: {  # AugmentConfig fields: crop + flip only
        "crop_scale": (0.6, 1.0), "flip": 0.5, "jitter_prob": 0.0, "grayscale_prob": 0.0})

    def __post_init__(self) -> None:
        if self.head_hidden_dim < 0:
            raise ValueError(f"rotation: head_hidden_dim must be >= 0, got {self.head_hidden_dim}")


@register
class Rotation(Objective):
    key = "rotation"
    Options = RotationOptions

    def __init__(self, spec: ObjectiveSpec, options: RotationOptions):
        super().__init__(spec, options)
        self.augment, _ = view_configs(options.augment)  # unknown augment fields fail here
        hidden = options.head_hidden_dim
        self.classifier = (projection_mlp(self.encoder.embed_dim, hidden, 4, layers=2) if hidden
                           else torch.nn.Linear(self.encoder.embed_dim, 4))

    def views(self) -> RotationView:
        config = self.encoder.config
        return RotationView(config.image_size, config.mean, config.std, self.augment)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        rotated, labels = rotate_batch(batch["image"])  # [4N, C, S, S], one encoder pass (shared BN statistics)
        features = self.encoder.encode_image(rotated)
        logits = self.classifier(features)
        return {"loss": pretext_classification_loss(logits, labels), "accuracy": pretext_accuracy(logits, labels),
                "embedding_std": embedding_std(features)}
