"""Losses: pure functions of tensors, one file per family."""
from .aim import aim_loss, non_prefix_mask
from .alignment import alignment, uniformity
from .capi import capi_loss, capi_targets
from .caption import caption_loss, caption_token_nll
from .clustering import sinkhorn, swav_loss
from .colorization import colorization_loss, rebalancing_weights, smoothed_prior
from .contrastive import clip_loss, info_nce, nt_xent
from .counting import counting_loss
from .cpc import cpc_logits, cpc_loss
from .dense import patch_nce, pixel_contrast, pixpro_consistency
from .dino import dino_loss, teacher_temperature_at
from .distill import queue_distillation_loss
from .ibot import dino_loss_from_probabilities, ibot_patch_loss, sinkhorn_teacher
from .ijepa import ijepa_loss
from .jigsaw_clustering import clustering_loss
from .masked_pixels import masked_pixel_l1, masked_pixel_mse
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
from .siglip import siglip_loss, siglip_negatives_loss
from .supcon import supcon

__all__ = [
    "CONTRASTIVE_LOSSES", "LOSS_OPTIONS", "aim_loss", "alignment", "barlow_twins", "byol_loss", "capi_loss",
    "capi_targets", "caption_loss", "caption_token_nll", "clip_loss", "clustering_loss", "colorization_loss",
    "contrastive_loss", "contrastive_loss_from_similarities", "cosine_logits", "counting_loss", "cpc_logits",
    "cpc_loss", "debiased_nce", "dino_loss", "dino_loss_from_probabilities", "flat_nce", "hard_negative_nce",
    "ibot_patch_loss", "ijepa_loss", "info_nce", "loss_options_for", "masked_pixel_l1", "masked_pixel_mse", "nce",
    "negative_cosine", "non_prefix_mask", "nt_xent", "patch_nce", "pixel_contrast", "pixpro_consistency",
    "pretext_accuracy", "pretext_classification_loss", "queue_distillation_loss", "rebalancing_weights",
    "siglip_loss", "siglip_negatives_loss", "similarities", "sinkhorn", "sinkhorn_teacher", "smoothed_prior",
    "supcon", "swav_loss", "teacher_temperature_at", "two_view_similarities", "uniformity",
]
