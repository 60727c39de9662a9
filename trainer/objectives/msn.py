"""MSN (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning") and PMSN (Assran et al. 2023,
"The Hidden Uniform Cluster Prior in Self-Supervised Learning").

MSN matches the prototype assignment of MASKED anchor views to that of an unmasked target view. Views of each
image: one target view and ``num_random_views`` random views (crops at the image size, scale 0.3-1) plus
``num_focal_views`` focal views (small crops at ``focal_crop_size``, scale 0.05-0.3). Random views are
randomly masked: ``mask_ratio`` of their patch tokens are dropped before the transformer blocks (0.15 for
ViT-S/16 in the paper). Focal views are focal masking as the authors' code does it, a small crop of the image
encoded alone (position embeddings resampled to its grid); with ``focal_block`` only a random contiguous
``focal_block x focal_block`` block of the focal view's patches is kept (the paper's Fig. 1 picture of focal
masking on a larger crop). Masks are drawn in the data workers (``trainer.data.masking``) and travel in the
batch as ``keep/<view>`` token indices.

Anchor views go through the online ViT (class token) and a 3-layer head (Linear-BN-GELU x 2, Linear; 2048 ->
256); the target view through the target network, an EMA of ViT + head (momentum 0.996 -> 1, cosine),
without masking or gradient. Predictions over K learnable prototypes (cosine / tau, tau 0.1 anchors, tau+
0.025 targets), optional Sinkhorn on the targets (the authors' config: on), loss = H(p+, p) averaged over
anchor views + lambda R(p_bar) with p_bar the mean anchor prediction over the GLOBAL batch
(``trainer.losses.msn``). MSN: R = log K - H(p_bar) (mean-entropy maximisation); PMSN changes only R, to
KL(p_bar || rho) with a power-law prior rho_k ∝ k^-0.25.

Implementation choices: ViT backbones only (``requires_patch_tokens``; a CNN is refused with the list of ViT
backbones). The exported model is the ONLINE encoder, as for every objective here (the loop saves
``objective.encoder``, which the recipe test checks receives gradients); the authors evaluate the target encoder,
which with momentum -> 1 ends close to it. The cross-entropy and p_bar are averaged over processes (all-gather
with gradient), Sinkhorn's sums are all-reduced, so 2 processes give the loss and gradients of 1. Prototypes
are a parameter normalised inside the loss (the authors' init, uniform +-1/sqrt(d)) and take no weight decay,
as in the authors' optimiser. The momentum follows the repository's cosine schedule (the authors': linear),
and the sharpening is constant (their config keeps T at 0.25 throughout).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.data.masking import WithKeepIndices, block_keep, random_keep
from trainer.data.multicrop import MultiCropViews
from trainer.data.views import AugmentConfig, view_configs
from trainer.distributed import (
    all_reduce_sum,
    max_over_processes,
    mean_over_processes,
    world_size,
)
from trainer.losses.msn import (
    MSNTerms,
    msn,
    msn_targets,
    pmsn,
    power_law_prior,
    prototype_log_probabilities,
)
from trainer.models.heads import gelu_mlp
from trainer.models.vit import forward_vit, patch_grid, vit_backbone

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import (
    as_number,
    require_at_least,
    require_momentum_schedule,
    require_non_negative,
    require_positive,
)

# The paper's colour distortion (strength 0.5), grayscale 0.2 and flips; no blur at 32 px.
PAPER_AUGMENT = {"jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.0}


def _scale(value, name: str) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 < low <= high <= 1:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {value}")
    return low, high


@dataclass
class MSNOptions:
    projection_dim: int = 256             # head output (paper 256)
    projection_hidden_dim: int = 2048     # hidden width of the 3-layer head (paper 2048)
    num_prototypes: int = 1024            # K (paper 1024 on ImageNet)
    temperature: float = 0.1              # tau of the anchor predictions
    target_temperature: float = 0.025     # tau+ of the targets (0.1 sharpened by T = 0.25)
    regularisation_weight: float = 1.0    # lambda of the regulariser
    sinkhorn_iterations: int = 3          # Sinkhorn rounds on the targets (authors' config: on); 0 turns it off
    mask_ratio: float = 0.15              # random masking of random views (ViT-S/16 0.15, ViT-B 0.3, ViT-L 0.7)
    num_random_views: int = 1             # masked anchor views at the image size (paper 1)
    num_focal_views: int = 10             # focal anchor views (paper 10)
    focal_crop_size: int = 16             # their side in px (paper 96 next to 224); a multiple of the patch size
    focal_block: int | None = None        # None: the whole focal crop (authors' code); b: keep a random b x b block
    crop_scale: tuple = (0.3, 1.0)        # target and random views (paper 0.3-1)
    focal_crop_scale: tuple = (0.05, 0.3)  # focal views (paper 0.05-0.3)
    momentum: float = 0.996               # EMA of the target network at step 0
    final_momentum: float = 1.0           # ... at the end (cosine schedule)
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields of every view

    def __post_init__(self):
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "num_random_views", "focal_crop_size")
        require_at_least(self, 2, "num_prototypes")
        require_at_least(self, 0, "sinkhorn_iterations", "num_focal_views")
        require_positive(self, "temperature", "target_temperature")
        require_non_negative(self, "regularisation_weight")
        if not 0.0 <= as_number(self, "mask_ratio") < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.focal_block is not None and self.focal_block < 1:
            raise ValueError(f"focal_block must be None or >= 1, got {self.focal_block}")
        require_momentum_schedule(self)
        self.crop_scale = _scale(self.crop_scale, "crop_scale")
        self.focal_crop_scale = _scale(self.focal_crop_scale, "focal_crop_scale")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class MSN(Objective):
    key = "msn"
    Options = MSNOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: MSNOptions):
        super().__init__(spec, options)
        vit = vit_backbone(self.encoder, self.key)
        self.grid = patch_grid(vit, spec.image_size)
        if options.focal_crop_size > spec.image_size:
            raise ValueError(f"{self.key}: focal_crop_size {options.focal_crop_size} is larger than the image "
                             f"size {spec.image_size}")
        try:
            self.focal_grid = patch_grid(vit, options.focal_crop_size)
        except ValueError as error:
            raise ValueError(f"{self.key}: focal_crop_size: {error}") from None
        if options.focal_block is not None and options.focal_block > self.focal_grid[0]:
            raise ValueError(f"{self.key}: focal_block {options.focal_block} is larger than the focal views' "
                             f"{self.focal_grid[0]} x {self.focal_grid[1]} patch grid")
        self.projector = gelu_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim)
        bound = options.projection_dim ** -0.5  # the authors' init: uniform in +-1/sqrt(d)
        prototypes = torch.empty(options.num_prototypes, options.projection_dim).uniform_(-bound, bound)
        self.prototypes = nn.Parameter(prototypes)
        # Deep copies draw no random numbers: every process builds the same target network.
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)

    def views(self) -> WithKeepIndices:
        config, o = self.encoder.config, self.options
        # global0: the target view; global1..: the random views; local0..: the focal views.
        crops = MultiCropViews(config.image_size, o.focal_crop_size, config.mean, config.std, o.num_focal_views,
                               AugmentConfig(**o.augment), o.crop_scale, o.focal_crop_scale, 1 + o.num_random_views)
        masks = {f"global{i}": functools.partial(random_keep, self.grid, o.mask_ratio)
                 for i in range(1, 1 + o.num_random_views)}
        if o.focal_block is not None:
            masks.update({f"local{i}": functools.partial(block_keep, self.focal_grid, o.focal_block)
                          for i in range(o.num_focal_views)})
        return WithKeepIndices(crops, masks)

    def _anchors(self, batch: dict, names: list[str]) -> torch.Tensor | None:
        """Head outputs of the anchor views ``names`` (each masked by ``keep/<name>`` when the batch has it) in one
        backbone pass: [len(names) * n, projection_dim], view by view; None for no views."""
        if not names:
            return None
        images = torch.cat([batch[name] for name in names])
        keeps = [batch.get(f"keep/{name}") for name in names]
        keep = None if keeps[0] is None else torch.cat(keeps)
        return self.projector(forward_vit(vit_backbone(self.encoder, self.key), images, keep).features)

    def _loss(self, anchor_log_probabilities: torch.Tensor, targets: torch.Tensor) -> MSNTerms:
        """MSN's loss with mean-entropy maximisation; PMSN overrides this with its prior."""
        return msn(anchor_log_probabilities, targets, self.options.regularisation_weight, mean_over_processes)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        o = self.options
        target_images = batch["global0"]
        rows = target_images.shape[0]
        with torch.no_grad():  # targets first: their activations are freed before the online graph is built
            target_vit = vit_backbone(self.target_encoder, self.key)
            target_z = self.target_projector(forward_vit(target_vit, target_images).features)
            targets = msn_targets(target_z, self.prototypes, o.target_temperature, o.sinkhorn_iterations,
                                  reduce_sum=all_reduce_sum, reduce_max=max_over_processes,
                                  total_samples=rows * world_size())
        random_z = self._anchors(batch, [f"global{i}" for i in range(1, 1 + o.num_random_views)])
        focal_z = self._anchors(batch, [f"local{i}" for i in range(o.num_focal_views)])
        z = random_z if focal_z is None else torch.cat([random_z, focal_z])
        log_probabilities = prototype_log_probabilities(z, self.prototypes, o.temperature)
        terms = self._loss(log_probabilities.view(-1, rows, o.num_prototypes), targets)
        return {"loss": terms.loss, "cross_entropy": terms.cross_entropy.detach(),
                "regulariser": terms.regulariser.detach(), "embedding_std": embedding_std(random_z[:rows]),
                "prototypes_used": targets.new_tensor(float(targets.argmax(dim=1).unique().numel()))}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The base's groups, with the prototypes moved to the group without weight decay (authors' optimiser)."""
        groups = super().parameter_groups(weight_decay)
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not self.prototypes]
        groups[1]["params"].append(self.prototypes)
        return groups

    def after_step(self, step: int, total_steps: int) -> None:
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)


@dataclass
class PMSNOptions(MSNOptions):
    power_law_exponent: float = 0.25      # tau of the prior rho_k ∝ k^-tau (paper 0.25)

    def __post_init__(self):
        super().__post_init__()
        require_non_negative(self, "power_law_exponent")


@register
class PMSN(MSN):
    key = "pmsn"
    Options = PMSNOptions

    def _loss(self, anchor_log_probabilities: torch.Tensor, targets: torch.Tensor) -> MSNTerms:
        prior = power_law_prior(anchor_log_probabilities.shape[-1], self.options.power_law_exponent)
        return pmsn(anchor_log_probabilities, targets, prior, self.options.regularisation_weight, mean_over_processes)
