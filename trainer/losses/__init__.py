"""Losses: pure functions of tensors, one file per family."""
from .alignment import alignment, uniformity
from .clustering import sinkhorn, swav_loss
from .colorization import colorization_loss, rebalancing_weights, smoothed_prior
from .contrastive import clip_loss, info_nce, nt_xent
from .counting import counting_loss
from .cpc import cpc_logits, cpc_loss
from .dense import patch_nce, pixel_contrast, pixpro_consistency
from .dino import dino_loss, teacher_temperature_at
from .jigsaw_clustering import clustering_loss
from .nce_family import (
    CONTRASTIVE_LOSSES,
    LOSS_OPTIONS,
    contrastive_loss,
    contrastive_loss_from_similarities,
    debiased_nce,
    flat_nce,
    hard_negative_nce,
    loss_options_for,
    nce,
    similarities,
    two_view_similarities,
)
from .noncontrastive import barlow_twins, byol_loss, negative_cosine
from .pretext import cosine_logits, pretext_accuracy, pretext_classification_loss
from .supcon import supcon

__all__ = [
    "CONTRASTIVE_LOSSES", "LOSS_OPTIONS", "alignment", "barlow_twins", "byol_loss", "clip_loss", "clustering_loss",
    "colorization_loss", "contrastive_loss", "cosine_logits", "counting_loss", "pretext_accuracy",
    "pretext_classification_loss", "rebalancing_weights", "smoothed_prior",
    "contrastive_loss_from_similarities", "cpc_logits", "cpc_loss", "debiased_nce", "dino_loss", "flat_nce",
    "hard_negative_nce", "info_nce", "loss_options_for", "negative_cosine", "nce", "nt_xent", "patch_nce",
    "pixel_contrast", "pixpro_consistency", "similarities", "sinkhorn", "supcon", "swav_loss",
    "teacher_temperature_at", "two_view_similarities", "uniformity",
]
