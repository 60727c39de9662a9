"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

No queue: the keys are the momentum encoder's outputs for the current batch, gathered from every process,
and each query's negatives are the other keys of the global batch. The query side is backbone -> 3-layer
projection MLP -> 2-layer prediction MLP (hidden layers Linear-BN-ReLU, outputs followed by BN without
affine, as in the paper's code); the key side is the momentum copy of backbone + projector (no predictor).
The loss is symmetric, ctr(q1, k2) + ctr(q2, k1), each InfoNCE term scaled by 2 tau (the paper's code), with
tau = 0.2. The momentum follows a cosine schedule from 0.99 to 1 (a pure function of the step, updated after
each optimizer step). With a ViT backbone (one with ``patch_embed``, e.g. ``vit-tiny-cifar``) the patch
projection is frozen at its random initialisation (sec. 4.2, the stability trick); ``freeze_patch_embed``
overrides.

Implementation choices: queries are gathered with gradient and the loss is computed over the global batch
on every rank, which equals the paper's per-rank loss with labels offset by rank after DDP's gradient
averaging; batch norm (heads, key side) uses global statistics like the paper's SyncBN. Both views share one
augmentation recipe (the paper's asymmetric blur/solarize is available through ``TwoViews``' second config,
as ``byol`` uses it, but not wired into this objective's options yet).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses import contrastive_loss
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import InfoNCEOptions


@dataclass
class MoCo3Options(InfoNCEOptions):
    temperature: float = 0.2          # tau (the paper's value for ViT; 1.0 for ResNet)
    momentum: float = 0.99            # start of the cosine momentum schedule
    final_momentum: float = 1.0       # its end
    projection_dim: int = 256         # output of projector and predictor
    projection_hidden_dim: int = 2048  # paper 4096; halved for CIFAR-size backbones
    projection_layers: int = 3
    predictor_hidden_dim: int = 2048  # paper 4096
    freeze_patch_embed: bool | None = None  # None: freeze when the backbone has a patch_embed (ViT)
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.2, 1.0), "jitter_strength": 0.5,
                                                   "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.0})


@register
class MoCo3(Objective):
    key = "moco3"
    Options = MoCo3Options

    def __init__(self, spec: ObjectiveSpec, options: MoCo3Options):
        super().__init__(spec, options)  # views(): the base's two-view recipe from options.augment
        backbone = self.encoder.backbone
        has_patch_embed = hasattr(backbone, "patch_embed")
        freeze = has_patch_embed if options.freeze_patch_embed is None else options.freeze_patch_embed
        if freeze:
            if not has_patch_embed:
                raise ValueError(f"moco3: freeze_patch_embed needs a ViT backbone with patch_embed, not {spec.backbone!r}")
            backbone.patch_embed.requires_grad_(False)  # random patch projection, never trained
        self.patch_embed_frozen = freeze
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers, last_bn=True)
        self.predictor = projection_mlp(options.projection_dim, options.predictor_hidden_dim, options.projection_dim,
                                        2, last_bn=True)
        # Deep copies draw no random numbers: every process builds the same momentum encoder.
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)

    def _query(self, images: torch.Tensor) -> torch.Tensor:
        return gather_with_grad(self.predictor(self.projector(self.encoder.encode_image(images))))

    @torch.no_grad()
    def _key(self, images: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(self.key_projector(self.key_encoder.encode_image(images)))

    def _contrast(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """ctr(q, k): in-batch InfoNCE of the global batch, scaled by 2 tau as in the paper's code."""
        loss = contrastive_loss(self.options.loss, query, key, None, self.options.temperature,
                                **self.options.loss_options())
        return 2.0 * self.options.temperature * loss

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x1, x2 = batch["view0"], batch["view1"]
        q1, q2 = self._query(x1), self._query(x2)  # separate passes: batch statistics per view, as the paper
        k1, k2 = self._key(x1), self._key(x2)
        loss = self._contrast(q1, k2) + self._contrast(q2, k1)
        with torch.no_grad():  # in-batch top-1: each query's own key out-scores the other keys
            hits = (F.normalize(q1, dim=1) @ F.normalize(k2, dim=1).t()).argmax(dim=1)
            accuracy = (hits == torch.arange(hits.shape[0], device=hits.device)).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def after_step(self, step: int, total_steps: int) -> None:
        # After step s the next forward is iteration s + 1: the paper sets m from that iteration's progress.
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.key_encoder, self.encoder, momentum)
        ema_update_(self.key_projector, self.projector, momentum)
