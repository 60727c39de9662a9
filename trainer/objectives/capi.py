"""CAPI (Darcet et al. 2025, "Cluster and Predict Latent Patches for Improved Masked Image Modeling").

A masked-image model whose targets are online cluster assignments of a teacher's patch features.

* Teacher: an EMA of the student encoder (momentum 0.999 -> 1, cosine) on the whole image, without gradient.
  Its patch features go through the online clustering head, logits = W normalise(x) + b over K prototypes
  (``num_clusters``), and position-wise Sinkhorn-Knopp over the global batch turns them into soft targets
  (``trainer.losses.capi.capi_targets``: target temperature 0.06, 3 rounds, column sums all-reduced across
  processes). The head learns the prototypes from its own cross-entropy to those targets (the clustering loss, at
  the prediction temperature 0.12), the authors' ``OnlineClustering``; the prototypes are not an EMA.
* Student: the exported ViT on the visible patches only (tokens dropped, ``forward_vit(..., keep=visible)``).
  Masking (drawn per sample in the data workers, in the batch as ``masks/global0``: visible indices, then the
  predicted ones): the paper's inverse block masking, ``mask_ratio`` 0.65 of the patches masked and the visible
  ones one block (aspect ratio 0.5-2), rolled cyclically (``trainer.data.masking.inverse_block_keep``), or uniform
  random masking (``masking: random``, the paper's other option).
* Predictor (``CAPIPredictor``): cross-attention only, as the authors' decoder. Queries: a learnable mask token plus
  the position embedding of each predicted patch; keys / values: the student's output tokens (prefix tokens and
  visible patches) embedded linearly to the predictor width, the patches with their position embedding added.
  Each block is pre-norm cross-attention + MLP (no bias, the authors' choice); queries never attend to each other,
  so each masked patch is predicted independently. A final LayerNorm and the student head, a weight-normalised
  linear map of the L2-normalised prediction to K logits (the authors' ``L2NormLinear``), give the prediction.
* Loss: ``trainer.losses.capi.capi_loss`` = cross-entropy between the student's softmax (temperature 0.12) and the
  teacher's Sinkhorn targets at the predicted patches + the clustering loss; the two touch disjoint parameters
  (students vs prototypes), so one backward pass equals the authors' two.

Implementation choices and deviations:
* Position embeddings: the ViT is timm's, with learnable absolute position embeddings added to the patch tokens;
  the predictor adds fixed 2-D sin-cos position embeddings to its queries and its context (the authors use RoPE in
  the encoder and predictor, and no absolute embeddings).
* Prediction subsampling: the authors predict a random 5% of the masked patches (``prediction_fraction`` 0.05, at
  224 px a ViT-L decoder on all of them is costly); at least one patch is predicted per image.
* Registers: the run's ``register_tokens`` (the paper uses 16; the recipe 4); the ViT also keeps timm's class token,
  which takes part in attention but in no loss. The exported feature is the mean of the (normed) patch tokens
  (``vit_pool="avg"``), the global representation CAPI's linear probes read (the paper's headline numbers use an
  attentive probe on the patch tokens, which this repository's evaluation does not have).
* One optimizer: the prototypes share the run's AdamW lr (the authors give them their own AdamW, lr 5e-4 vs 1e-3,
  weight decay 0.01) and take no weight decay. The momentum schedule is the repository's cosine from
  ``momentum`` to ``final_momentum`` (the authors' warms up from 1.0 first). The exported model is the student
  encoder (the loop saves ``objective.encoder``); the authors also evaluate the EMA.
* The per-token means of both cross-entropies are averaged over processes (all-gather with gradient), and Sinkhorn's
  column sums and maximum are all-reduced, so 2 processes give the loss and gradients of 1.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.masking import WithKeepIndices, inverse_block_keep
from trainer.data.multicrop import MultiCropViews
from trainer.data.views import AugmentConfig
from trainer.distributed import (
    all_reduce_sum,
    gather_no_grad,
    mean_over_processes,
)
from trainer.losses.capi import capi_loss, capi_targets
from trainer.models import ModelConfig
from trainer.models.vit import forward_vit, patch_grid, vit_backbone

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std
from .ijepa import sincos_positions
from .momentum import ema_update_, momentum_at, momentum_copy
from .options import (
    require_at_least,
    require_in_range,
    require_momentum_schedule,
    require_positive,
)

MASKS = "masks/global0"  # the batch key of the packed masks: V visible indices, then P predicted indices
MASKINGS = ("inverse_block", "random")


def _max_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a [1, ...] tensor over processes."""
    return gather_no_grad(tensor).amax(dim=0, keepdim=True)


def capi_mask_counts(grid: tuple[int, int], mask_ratio: float, prediction_fraction: float) -> tuple[int, int]:
    """(V visible, P predicted) patches per image: M = int(L * mask_ratio) masked (the authors' count),
    V = L - M, P = max(1, int(M * prediction_fraction))."""
    patches = grid[0] * grid[1]
    masked = int(patches * mask_ratio)
    return patches - masked, max(1, int(masked * prediction_fraction))


def packed_capi_masks(grid: tuple[int, int], mask_ratio: float, masking: str, aspect_ratio: tuple, roll: bool,
                      prediction_fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample's masks as one int64 tensor [V + P]: the visible patches (ascending), then P of the masked ones
    drawn uniformly (ascending), the patches whose clusters the student predicts."""
    patches = grid[0] * grid[1]
    visible_count, predicted_count = capi_mask_counts(grid, mask_ratio, prediction_fraction)
    if masking == "inverse_block":
        visible = inverse_block_keep(grid, mask_ratio, aspect_ratio, roll, generator)
    else:  # the authors' uniform masking: a uniformly random set of M masked patches
        visible = torch.randperm(patches, generator=generator)[:visible_count].sort().values
    masked = torch.ones(patches, dtype=torch.bool)
    masked[visible] = False
    masked = masked.nonzero().flatten()
    predicted = masked[torch.randperm(masked.numel(), generator=generator)[:predicted_count]].sort().values
    return torch.cat([visible, predicted])


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention of the queries to a context, then an MLP, both residual (the authors' decoder
    block: no self-attention among the queries, no biases)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.query_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key_value = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        count, length, dim = queries.shape
        q = self.query(self.query_norm(queries)).view(count, length, self.heads, -1).transpose(1, 2)
        k, v = self.key_value(context).view(count, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(count, length, dim)
        queries = queries + self.project(attended)
        return queries + self.mlp(self.mlp_norm(queries))


class CAPIPredictor(nn.Module):
    """CAPI's cross-attention predictor.

    Args:
        encoder_dim: width of the student's output tokens.
        grid: (rows, columns) of the patch grid (the position embeddings).
        dim: the predictor's width (the authors: the encoder's).
        depth: cross-attention blocks (paper 12 next to a 24-block ViT-L).
        heads: attention heads per block.
    """

    def __init__(self, encoder_dim: int, grid: tuple[int, int], dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("position", sincos_positions(grid, dim), persistent=False)  # a function of the grid
        self.blocks = nn.ModuleList([_CrossAttentionBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)  # the authors' final norm has no affine
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():  # the authors' (MAE's) init: Xavier-uniform linear weights, zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int, visible_index: torch.Tensor,
                predicted_index: torch.Tensor) -> torch.Tensor:
        """Predictions at the predicted patches.

        Args:
            tokens: [n, P0 + V, encoder_dim] the student's output tokens: P0 prefix tokens, then the V visible patches.
            num_prefix_tokens: P0 (class token, registers).
            visible_index: [n, V] the visible patches' indices (raster order of the grid).
            predicted_index: [n, P] the indices of the patches to predict.
        Returns:
            [n, P, dim], normed.
        """
        position = self.position.to(tokens.device)
        context = self.embed(tokens)
        context = torch.cat([context[:, :num_prefix_tokens],
                             context[:, num_prefix_tokens:] + position[visible_index].to(context.dtype)], dim=1)
        queries = (self.mask_token + position[predicted_index]).to(context.dtype)
        for block in self.blocks:
            queries = block(queries, context)
        return self.norm(queries)


class NormalisedLinear(nn.Module):
    """The authors' ``L2NormLinear``: logits_k = g_k <v_k / |v_k|, x / |x|> (a weight-normalised linear map without
    bias of the L2-normalised input; v truncated-normal 0.02, the norms g learnable from 1)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.direction = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, dim), std=0.02))
        self.scale = nn.Parameter(torch.ones(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.direction, dim=1) * self.scale.unsqueeze(1)
        return F.normalize(x, dim=-1) @ weight.t().to(x.dtype)


class OnlineClustering(nn.Module):
    """The online clustering head: logits = W normalise(x) + b over K prototypes (W normal std 1, b zero, as the
    authors' ``OnlineClustering``)."""

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.layer = nn.Linear(dim, num_clusters)
        nn.init.normal_(self.layer.weight, std=1.0)
        nn.init.zeros_(self.layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(F.normalize(x, dim=-1, eps=1e-7))


def _range(value, name: str, upper: float = 1.0) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 < low <= high <= upper:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper:g}, got {value}")
    return low, high


@dataclass
class CAPIOptions:
    num_clusters: int = 16384              # K prototypes (paper 16384)
    student_temperature: float = 0.12      # tau_s of the student's prediction (paper 0.12)
    target_temperature: float = 0.06       # tau_t of the Sinkhorn targets (paper 0.06)
    clustering_temperature: float = 0.12   # tau_p of the clustering head's own prediction (the authors' 0.12)
    sinkhorn_iterations: int = 3           # position-wise Sinkhorn rounds (paper 3)
    mask_ratio: float = 0.65               # fraction of the patches masked (paper 0.65)
    masking: str = "inverse_block"         # "inverse_block" (paper) | "random"
    block_aspect_ratio: tuple = (0.5, 2.0)  # the visible block's height / width (authors 0.5-2)
    roll: bool = True                      # shift the visible block cyclically (authors: on)
    prediction_fraction: float = 0.05      # of the masked patches, the share predicted (authors 0.05)
    predictor_depth: int = 12              # cross-attention blocks (paper 12 with ViT-L)
    predictor_dim: int | None = None       # None: the encoder's width (the authors')
    predictor_heads: int | None = None     # None: the encoder's heads
    crop_scale: tuple = (0.6, 1.0)         # random resized crop (paper 0.6-1), the only other augmentation a flip
    flip: float = 0.5                      # horizontal flip probability (paper 0.5)
    momentum: float = 0.999                # EMA of the teacher at step 0 (paper 0.999)
    final_momentum: float = 1.0            # ... at the end (cosine)

    def __post_init__(self):
        require_at_least(self, 2, "num_clusters")
        require_at_least(self, 1, "sinkhorn_iterations", "predictor_depth")
        require_positive(self, "student_temperature", "target_temperature", "clustering_temperature")
        require_in_range(self, 0.0, 1.0, "flip", "prediction_fraction")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.prediction_fraction <= 0:
            raise ValueError(f"prediction_fraction must be in (0, 1], got {self.prediction_fraction}")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        for name in ("predictor_dim", "predictor_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        require_momentum_schedule(self)
        self.block_aspect_ratio = _range(self.block_aspect_ratio, "block_aspect_ratio", upper=math.inf)
        self.crop_scale = _range(self.crop_scale, "crop_scale")


@register
class CAPI(Objective):
    key = "capi"
    Options = CAPIOptions
    requires_patch_tokens = True

    def __init__(self, spec: ObjectiveSpec, options: CAPIOptions):
        super().__init__(spec, options)
        vit = vit_backbone(self.encoder, self.key)
        o = options
        self.grid = patch_grid(vit, spec.image_size)
        self.visible_count, self.predicted_count = capi_mask_counts(self.grid, o.mask_ratio, o.prediction_fraction)
        dim = o.predictor_dim or vit.embed_dim
        heads = o.predictor_heads or vit.blocks[0].attn.num_heads
        if dim % heads or dim % 4:
            raise ValueError(f"{self.key}: the predictor width {dim} must be a multiple of its heads ({heads}) and "
                             f"of 4 (2-D sin-cos positions); set predictor_dim / predictor_heads")
        self.predictor = CAPIPredictor(vit.embed_dim, self.grid, dim, o.predictor_depth, heads)
        self.head = NormalisedLinear(dim, o.num_clusters)
        self.clustering = OnlineClustering(vit.embed_dim, o.num_clusters)
        # A deep copy draws no random numbers: every process builds the same teacher.
        self.target_encoder = momentum_copy(self.encoder)

    def model_config(self, spec: ObjectiveSpec, options: CAPIOptions) -> ModelConfig:
        """The ViT with the mean of its patch tokens as the feature (CAPI has no class token to read)."""
        return default_model_config(spec, vit_pool="avg")

    def views(self) -> WithKeepIndices:
        config, o = self.encoder.config, self.options
        augment = AugmentConfig(crop_scale=o.crop_scale, flip=o.flip, jitter_prob=0.0, grayscale_prob=0.0,
                                blur_prob=0.0)
        crop = MultiCropViews(config.image_size, config.image_size, config.mean, config.std, 0, augment,
                              o.crop_scale, num_global=1)
        draw = functools.partial(packed_capi_masks, self.grid, o.mask_ratio, o.masking, o.block_aspect_ratio, o.roll,
                                 o.prediction_fraction)
        return WithKeepIndices(crop, {"global0": draw}, key_prefix="masks")

    def split_masks(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed masks [n, V + P] -> (visible indices [n, V], predicted indices [n, P])."""
        expected = self.visible_count + self.predicted_count
        if masks.dim() != 2 or masks.shape[1] != expected:
            raise ValueError(f"{self.key}: expected packed masks [n, {expected}] (V = {self.visible_count} visible, "
                             f"P = {self.predicted_count} predicted), got {tuple(masks.shape)}")
        masks = masks.long()
        return masks[:, :self.visible_count], masks[:, self.visible_count:]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        o = self.options
        images = batch["global0"]
        visible, predicted = self.split_masks(batch[MASKS].to(images.device))
        with torch.no_grad():  # the teacher first: its activations are freed before the student's graph is built
            teacher = forward_vit(vit_backbone(self.target_encoder, self.key), images).patches
        clustering_logits = self.clustering(teacher.float())  # [n, L, K]; gradient to the prototypes only
        assignments = capi_targets(clustering_logits, o.target_temperature, o.sinkhorn_iterations,
                                   reduce_sum=all_reduce_sum, reduce_max=_max_over_processes)
        targets = assignments.gather(1, predicted.unsqueeze(-1).expand(-1, -1, o.num_clusters))
        student = forward_vit(vit_backbone(self.encoder, self.key), images, keep=visible)
        predictions = self.predictor(student.tokens, student.num_prefix_tokens, visible, predicted)
        terms = capi_loss(self.head(predictions), targets, clustering_logits, assignments, o.student_temperature,
                          o.clustering_temperature, mean_over_processes)
        return {"loss": terms.loss, "prediction": terms.prediction.detach(), "clustering": terms.clustering.detach(),
                "embedding_std": embedding_std(student.patches.mean(dim=1)),
                "clusters_used": assignments.new_tensor(float(assignments.argmax(dim=-1).unique().numel()))}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The base's groups, with the clustering prototypes moved to the group without weight decay."""
        groups = super().parameter_groups(weight_decay)
        prototypes = set(map(id, self.clustering.parameters()))
        groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in prototypes]
        groups[1]["params"] += [p for p in self.clustering.parameters() if p.requires_grad]
        groups[1]["params"] = list({id(p): p for p in groups[1]["params"]}.values())
        return groups

    def after_step(self, step: int, total_steps: int) -> None:
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
