"""Exemplar-CNN (Dosovitskiy, Springenberg, Riedmiller & Brox 2014, "Discriminative Unsupervised Feature
Learning with Convolutional Neural Networks").

Surrogate classes: one seed patch per training image, taken where the image has considerable gradients (the
patch position is drawn with probability proportional to the patch's mean squared Sobel gradient magnitude, by
a generator seeded with the sample id, so an image keeps the same seed patch in every epoch), and each class is
the set of random transforms of its patch: the data workers emit ``num_copies`` copies per image, each under its
own translation, zoom, rotation, flip, contrast/brightness, saturation and hue change (``ExemplarView``, one
batched ``grid_sample`` per image). The network classifies every copy into its surrogate class.

The surrogate class of an image is its sample id (``batch["id"]``, the dense slot 0..n-1 the loop gives every
sample), so there are ``spec.num_train_samples`` classes. The classifier is a normalised linear one (cosine similarity of a
``projection_dim`` projection with one weight vector per class, divided by a temperature; NormFace), not the
paper's plain softmax layer, because with one class per image (50,000 on CIFAR-10) each class appears in a
batch about once an epoch: a plain linear layer's rows then grow or shrink with their update counts, and its
logits are unbounded, while the cosine classifier's logits stay in [-1/t, 1/t] and its memory is a
``projection_dim``-wide matrix (128 x 50,000 floats = 25 MB) rather than backbone width x classes. The class
weights are exempt from weight decay (their norm does not enter the logits). The projection and the class
weights are training only; the exported encoder is the backbone.

Implementation choices at CIFAR scale: 20 px seed patches of the 32 px image (the paper: 32 of 96), rendered at
32 px, 4 copies per image and step (the paper: up to 300 transforms per class, over all epochs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from trainer.data.pretext_inputs import ExemplarTransformConfig, ExemplarView
from trainer.losses.pretext import cosine_logits, pretext_accuracy, pretext_classification_loss

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .instdisc import SLOTS_HINT
from .options import require_at_least


@dataclass
class ExemplarOptions:
    seed_patch: int = 20         # seed patch side in px of the image (the paper: 32 of 96)
    num_copies: int = 4          # transformed copies of each seed patch per step
    projection_dim: int = 128    # width of the cosine classifier's space
    temperature: float = 0.1     # logits = cos / temperature
    num_classes: int | None = None  # None: spec.num_train_samples (one surrogate class per training image)
    patch_seed: int = 0          # seeds the seed-patch choice (with the sample id)
    transforms: dict = field(default_factory=dict)  # ExemplarTransformConfig fields

    ALIASES: ClassVar[dict[str, str]] = {"feature_dim": "projection_dim"}

    def __post_init__(self) -> None:
        require_at_least(self, 1, "num_copies", "seed_patch", "projection_dim")
        if self.temperature <= 0:
            raise ValueError(f"exemplar: temperature must be > 0, got {self.temperature}")


@register
class Exemplar(Objective):
    key = "exemplar"
    Options = ExemplarOptions
    dense_sample_ids = True  # batch["id"]: the sample's dense slot 0..n-1 (trainer.data.slots)

    def __init__(self, spec: ObjectiveSpec, options: ExemplarOptions):
        super().__init__(spec, options)
        try:
            self.transforms = ExemplarTransformConfig(**options.transforms)
        except TypeError as error:
            raise ValueError(f"exemplar transforms: {error}") from None
        classes = options.num_classes or spec.num_train_samples
        if not classes or classes < 2:
            raise ValueError(f"exemplar needs the number of training samples (>= 2), one surrogate class each, "
                             f"got {classes}; give num_classes or train on shards with a manifest")
        if options.seed_patch > spec.image_size:
            raise ValueError(f"exemplar: seed_patch {options.seed_patch} is larger than the {spec.image_size} px image")
        self.num_classes = int(classes)
        self.projector = nn.Linear(self.encoder.embed_dim, options.projection_dim)
        self.class_weights = nn.Parameter(nn.functional.normalize(torch.randn(self.num_classes, options.projection_dim), dim=1))

    def views(self) -> ExemplarView:
        o, config = self.options, self.encoder.config
        return ExemplarView(config.image_size, o.seed_patch, config.image_size, o.num_copies, config.mean, config.std,
                            self.transforms, o.patch_seed)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        groups = super().parameter_groups(weight_decay)
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not self.class_weights]
        groups[1]["params"].append(self.class_weights)  # normalised in the logits: decay would only inflate the lr
        return groups

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        patches, ids = batch["patches"], batch["id"]  # [N, K, C, S, S], [N]
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_classes:
            raise ValueError(f"exemplar: sample ids must be dense in [0, {self.num_classes}) to index the surrogate "
                             f"classes, got [{int(ids.min())}, {int(ids.max())}]; {SLOTS_HINT}")
        n, copies = patches.shape[:2]
        features = self.encoder.encode_image(patches.flatten(0, 1))  # all copies of all patches, one pass
        labels = ids.long().repeat_interleave(copies)
        logits = cosine_logits(self.projector(features), self.class_weights, self.options.temperature)
        return {"loss": pretext_classification_loss(logits, labels), "accuracy": pretext_accuracy(logits, labels),
                "embedding_std": embedding_std(features)}
