"""Losses: pure functions of tensors, one file per family."""
from .alignment import alignment, uniformity
from .contrastive import clip_loss, info_nce, nt_xent
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
from .supcon import supcon

__all__ = [
    "CONTRASTIVE_LOSSES", "LOSS_OPTIONS", "alignment", "clip_loss", "contrastive_loss",
    "contrastive_loss_from_similarities", "debiased_nce", "flat_nce", "hard_negative_nce", "info_nce",
    "loss_options_for", "nce", "nt_xent", "similarities", "supcon", "two_view_similarities",
    "uniformity",
]
