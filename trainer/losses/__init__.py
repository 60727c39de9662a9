"""Losses: pure functions of tensors, one file per family."""
from .contrastive import clip_loss, info_nce, nt_xent

__all__ = ["clip_loss", "info_nce", "nt_xent"]
