"""All4One (Estepa et al. 2023, "All4One: Symbiotic Neighbour Contrastive Learning via Self-Attention and
Redundancy Reduction").

What the paper adds to NNCLR: several neighbours at the cost of one, through "centroids", plus redundancy
reduction. Online network: backbone -> projector (3 layers with BN, 2048 -> 256) -> two predictors (2 layers,
4096 hidden); momentum target: EMA of backbone + projector (cosine schedule from 0.99 to 1, the authors'
code). The target projections of each view, L2-normalised, look up their k = 5 nearest neighbours in a
support set (FIFO queue of view 1's target projections, 98,304). Three terms:

* neighbour contrast: NNCLR's, InfoNCE of the first neighbour NN(z1) against the other view's prediction p2
  (and NN(z2) against p1), anchored on the neighbour as in the authors' code (tau 0.2);
* centroid contrast: the k neighbours plus a fixed sinusoidal position code go through a small transformer
  encoder (3 layers, 8 heads, feed-forward 2 x 256, dropout 0.1) whose first output token is the view's
  centroid; the "shifted" sequence (the second predictor's output, then the first k - 1 neighbours) gives a
  second centroid; InfoNCE between one view's centroid and the other view's shifted centroid (tau 0.1);
* feature contrast: redundancy reduction over the feature dimension, the [D, D] cosines between the feature
  columns (normalised over the batch) of one view's target projection and the other view's online projection,
  diagonal to 1 and off-diagonal to 0 (``trainer.losses.all4one.feature_contrast``).

Loss = 0.5 neighbour + 0.5 centroid + 0.5 x 10 feature (the authors' weights; ``feature_weight`` = 5).

Implementation choices: everything is over the global batch (predictions, centroid inputs and projections
gathered with gradient, target projections without), so every process holds the same queue and computes the
loss of the whole batch; the queue takes a step's target projections after its optimizer step. Until the queue
holds k rows (the first step) the neighbours come from the batch itself (``SupportSet``). The position code
is the authors' (their ``PositionalEncodingPermute1D(5)``: sequence slot c adds sin / cos of the feature index
at slot c's frequency). The projector's output BN has no affine parameters; the transformer trains at the
run's learning rate (the authors fix it at 0.1). Logged: the three terms, ``embedding_std`` of view 1's
online projections and ``nn_similarity`` (mean cosine of a target projection and its first neighbour).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.views import view_configs
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.all4one import (
    centroid_contrast,
    feature_contrast,
    neighbour_contrast,
)
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .byol import PAPER_AUGMENT, PAPER_SECOND_VIEW
from .diagnostics import embedding_std
from .momentum import ema_update_, momentum_at, momentum_copy
from .nnclr import neighbour_similarity
from .options import as_number, require_at_least, require_momentum_schedule, require_non_negative, require_positive
from .support_set import SupportSet


@dataclass
class All4OneOptions:
    temperature: float = 0.2            # tau of the neighbour contrast (authors' config 0.2)
    centroid_temperature: float = 0.1   # tau of the centroid contrast (authors' code 0.1)
    neighbour_weight: float = 0.5       # weights of the three terms (authors' code: 0.5, 0.5, 0.5 x 10)
    centroid_weight: float = 0.5
    feature_weight: float = 5.0
    queue_size: int = 98304             # support set size (authors' config 98,304)
    num_neighbours: int = 5             # k, the length of the centroid sequences (authors: 5)
    projection_dim: int = 256           # projector, predictors and transformer width (authors 256)
    projection_hidden_dim: int = 2048   # projector hidden width (authors 2048)
    projection_layers: int = 3          # authors 3, BN on every layer
    predictor_hidden_dim: int = 4096    # both predictors' hidden width (authors 4096)
    transformer_layers: int = 3         # authors 3
    transformer_heads: int = 8          # authors 8; must divide projection_dim
    transformer_hidden_dim: int = 512   # feed-forward width (authors: 2 x projection_dim)
    transformer_dropout: float = 0.1    # authors 0.1
    momentum: float = 0.99              # base of the cosine EMA schedule (authors' config 0.99)
    final_momentum: float = 1.0         # its end
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # view0: BYOL's (authors' asymmetric)
    second_view_augment: dict = field(default_factory=lambda: dict(PAPER_SECOND_VIEW))  # view1: laid over augment

    def __post_init__(self):
        require_positive(self, "temperature", "centroid_temperature")
        require_non_negative(self, "neighbour_weight", "centroid_weight", "feature_weight")
        require_momentum_schedule(self)
        if not 0.0 <= as_number(self, "transformer_dropout") < 1.0:
            raise ValueError(f"transformer_dropout must be in [0, 1), got {self.transformer_dropout}")
        require_at_least(self, 1, "queue_size", "num_neighbours", "projection_dim", "projection_hidden_dim",
                         "projection_layers", "predictor_hidden_dim", "transformer_layers", "transformer_heads",
                         "transformer_hidden_dim")
        if self.projection_dim % self.transformer_heads:
            raise ValueError(f"transformer_heads ({self.transformer_heads}) must divide projection_dim "
                             f"({self.projection_dim})")
        if self.queue_size < self.num_neighbours:
            raise ValueError(f"queue_size ({self.queue_size}) must be >= num_neighbours ({self.num_neighbours})")
        view_configs(self.augment, self.second_view_augment)  # unknown augmentation fields fail here


def neighbour_position_code(length: int, dim: int) -> torch.Tensor:
    """The authors' position code of a ``length``-slot sequence of ``dim``-d rows, [length, dim]: slot c holds
    sin (c even) or cos (c odd) of f * x over the feature index x = 0..dim-1, at f = 10000^(-2 floor(c/2) / C),
    C = ``length`` rounded up to even (``PositionalEncodingPermute1D(length)`` applied to [N, length, dim])."""
    channels = 2 * math.ceil(length / 2)
    frequency = 10000.0 ** (-torch.arange(0, channels, 2, dtype=torch.float64) / channels)  # [channels / 2]
    angle = torch.arange(dim, dtype=torch.float64)[:, None] * frequency[None, :]  # [dim, channels / 2]
    code = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # [dim, channels]: sin, cos interleaved
    return code[:, :length].t().float().contiguous()


@register
class All4One(Objective):
    key = "all4one"
    Options = All4OneOptions

    def __init__(self, spec: ObjectiveSpec, options: All4OneOptions):
        super().__init__(spec, options)  # views(): the base's two-view recipe (augment, second_view_augment)
        dim = options.projection_dim
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, dim,
                                        options.projection_layers, last_bn=True)
        self.predictor = projection_mlp(dim, options.predictor_hidden_dim, dim, 2)
        self.centroid_predictor = projection_mlp(dim, options.predictor_hidden_dim, dim, 2)
        layer = nn.TransformerEncoderLayer(dim, options.transformer_heads, options.transformer_hidden_dim,
                                           options.transformer_dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, options.transformer_layers, enable_nested_tensor=False)
        self.register_buffer("position_code", neighbour_position_code(options.num_neighbours, dim), persistent=False)
        # Deep copies draw no random numbers: every process builds the same target network.
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)
        self.support_set = SupportSet(options.queue_size, dim)

    @torch.no_grad()
    def _target(self, images: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(F.normalize(self.target_projector(self.target_encoder.encode_image(images)), dim=1))

    def _centroid(self, sequence: torch.Tensor) -> torch.Tensor:
        """The transformer's first output token for a [N, k, D] sequence (position code added): [N, D]."""
        return self.transformer(sequence + self.position_code.to(sequence.dtype))[:, 0]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        o = self.options
        x1, x2 = batch["view0"], batch["view1"]
        t1, t2 = self._target(x1), self._target(x2)  # global, normalised, no gradient
        nn1, nn2 = self.support_set.nearest_k(t1, o.num_neighbours), self.support_set.nearest_k(t2, o.num_neighbours)
        z1 = self.projector(self.encoder.encode_image(x1))
        z2 = self.projector(self.encoder.encode_image(x2))
        p1, p2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        q1, q2 = gather_with_grad(self.centroid_predictor(z1)), gather_with_grad(self.centroid_predictor(z2))
        neighbour = 0.5 * (neighbour_contrast(nn1[:, 0], p2, o.temperature, symmetric=False)
                           + neighbour_contrast(nn2[:, 0], p1, o.temperature, symmetric=False))
        # The shifted sequence puts the view's own prediction first and drops the last neighbour.
        shifted1 = self._centroid(torch.cat([q1[:, None].to(nn1.dtype), nn1[:, :-1]], dim=1))
        shifted2 = self._centroid(torch.cat([q2[:, None].to(nn2.dtype), nn2[:, :-1]], dim=1))
        centroid = centroid_contrast(self._centroid(nn1), shifted1, self._centroid(nn2), shifted2,
                                     o.centroid_temperature)
        feature = feature_contrast([(t1, gather_with_grad(z2)), (t2, gather_with_grad(z1))])
        loss = o.neighbour_weight * neighbour + o.centroid_weight * centroid + o.feature_weight * feature
        if self.training:
            self.support_set.stage(t1)
        return {"loss": loss, "neighbour_loss": neighbour.detach(), "centroid_loss": centroid.detach(),
                "feature_loss": feature.detach(), "embedding_std": embedding_std(z1),
                "nn_similarity": neighbour_similarity(t1, nn1[:, 0])}

    def after_step(self, step: int, total_steps: int) -> None:
        momentum = momentum_at(step + 1, total_steps, self.options.momentum, self.options.final_momentum)
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_projector, self.projector, momentum)
        self.support_set.flush()
