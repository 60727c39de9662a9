"""Pretext-task classification losses (rotation, jigsaw, context prediction, Exemplar-CNN).

The four pretext tasks of Gidaris et al. 2018 (4 rotations), Noroozi & Favaro 2016 (permutation index),
Doersch et al. 2015 (8 neighbour positions) and Dosovitskiy et al. 2014 (surrogate classes) are all
classification with a softmax cross-entropy; Exemplar-CNN's surrogate classes (one per training image, tens of
thousands) are scored here by a normalised (cosine) linear classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pretext_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy -log softmax(logits)[label] of a pretext task.

    logits [M, K] (K pretext classes: 4 rotations, |P| permutations, 8 neighbours), labels [M] int64 in [0, K).
    Returns a scalar."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [M, K] and labels [M], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels)


def pretext_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max class is the label; logits [M, K], labels [M] -> scalar (no gradient)."""
    return (logits.detach().argmax(dim=1) == labels).float().mean()


def cosine_logits(features: torch.Tensor, class_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised linear classifier (NormFace, Wang et al. 2017): cos(f_i, w_k) / temperature.

    features [M, D], class_weights [K, D] (one row per surrogate class) -> logits [M, K]; both sides are
    L2-normalised, so every logit lies in [-1/temperature, 1/temperature]."""
    return F.normalize(features.float(), dim=1) @ F.normalize(class_weights.float(), dim=1).t() / temperature

