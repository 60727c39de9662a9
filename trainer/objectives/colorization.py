"""Colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization") as a pretext task.

The encoder sees only the lightness L of CIE Lab and predicts, for every cell of a low-resolution grid, a
distribution over the quantised in-gamut ab bins (``trainer.data.lab.gamut_bins``: cells of side ``grid`` that
the sRGB gamut occupies, computed by sampling the cube: 261 with grid 10 under exact nearest-centre
quantisation; the paper's table has 313). The target is the paper's soft encoding: the 5 nearest bins of the
cell's ground-truth ab, Gaussian-weighted (sigma 5). Loss: multinomial cross-entropy (eq. 2), optionally
class-rebalanced (section 2.2): each cell is weighted by w(argmax_q Z), w ~ ((1 - lambda) p~ + lambda / Q)^-1 with
lambda 0.5 and p~ the empirical bin distribution smoothed by a Gaussian (sigma 5) over ab.

* Input: the view recipe (data workers) crops and flips the image, converts it to Lab (vectorised), averages ab
  over the target grid's cells and soft-encodes it, so only [cells, 5] indices and weights travel; the image
  itself travels as normalised RGB. The L channel is taken in-graph: the encoder is an ``EmbeddingModel`` with
  ``colour_space: lab`` and ``view_channels: [[0]]`` (one 1-channel backbone on L, as CMC's L view), so training,
  kNN evaluation, ONNX export and serving all feed normal RGB and the model itself keeps only L: the same
  grayscale input everywhere, no train/test mismatch.
* Head: the backbone's spatial map (``feature_map``, 4x4 for cnn-small / resnet18-cifar at 32 px) -> 1x1
  conv-BN-ReLU -> bilinear upsampling to ``target_size`` (8: the paper predicts at 1/4 of the input side) ->
  1x1 conv to Q logits. Dropped at export.
* Rebalancing prior: no pass over the data happens before training, so the bin frequencies are accumulated as
  a buffer (``bin_counts``: the soft targets summed over every cell seen, all-reduced over processes, saved in
  checkpoints) and the weights come from the counts up to and including the current batch. On a stationary
  data stream this converges to the paper's training-set prior after a few hundred images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from trainer.data.lab import dense_targets, gamut_bins, rgb_to_lab, soft_encode
from trainer.distributed import all_reduce_sum
from trainer.losses.colorization import colorization_loss, rebalancing_weights, smoothed_prior
from trainer.models import ModelConfig, conv_bn_relu
from trainer.models.dense import feature_map, probe_shapes

from .base import Objective, ObjectiveSpec, default_model_config, register
from .diagnostics import embedding_std


@dataclass
class ColorizationOptions:
    grid: float = 10.0            # ab quantisation step (the paper: 10 -> 313 bins)
    neighbours: int = 5           # soft encoding: nearest bins
    sigma: float = 5.0            # soft encoding: Gaussian width in ab units
    target_size: int = 8          # side of the predicted ab grid (the paper: 1/4 of the input side)
    rebalance: bool = True        # class rebalancing (section 2.2)
    rebalance_mix: float = 0.5    # lambda
    prior_sigma: float = 5.0      # smoothing of the empirical prior over ab
    head_hidden_dim: int = 256    # width of the 1x1 conv-BN-ReLU layer before the bin classifier
    crop_scale: tuple = (0.5, 1.0)
    flip: float = 0.5

    ALIASES: ClassVar[dict[str, str]] = {"head_dim": "head_hidden_dim"}


class ColorizationViews:
    """(PIL image, sample) -> ``image`` (normalised RGB [3, S, S]) and the soft-encoded ab of its target grid:
    ``ab_index`` [t*t, K] int64 and ``ab_weight`` [t*t, K]."""

    def __init__(self, size: int, mean, std, bins: torch.Tensor, target_size: int, neighbours: int, sigma: float,
                 crop_scale=(0.5, 1.0), flip: float = 0.5):
        geometric = [T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True)]
        if flip > 0:
            geometric.append(T.RandomHorizontalFlip(flip))
        self.geometric = T.Compose([*geometric, T.ToTensor()])
        self.normalise = T.Normalize(mean, std)
        self.bins, self.target_size, self.neighbours, self.sigma = bins, target_size, neighbours, sigma

    def __call__(self, image, sample) -> dict:
        rgb = self.geometric(image.convert("RGB"))                                 # [3, S, S] in [0, 1]
        ab = rgb_to_lab(rgb.permute(1, 2, 0))[..., 1:].permute(2, 0, 1)           # [2, S, S]
        ab = F.adaptive_avg_pool2d(ab[None], self.target_size)[0]                 # [2, t, t] mean ab per cell
        index, weight = soft_encode(ab.flatten(1).t(), self.bins, self.neighbours, self.sigma)
        return {"image": self.normalise(rgb), "ab_index": index, "ab_weight": weight}


@register
class Colorization(Objective):
    key = "colorization"
    Options = ColorizationOptions

    def __init__(self, spec: ObjectiveSpec, options: ColorizationOptions):
        super().__init__(spec, options)
        if options.grid <= 0 or options.sigma <= 0 or options.prior_sigma <= 0 or options.head_hidden_dim < 1:
            raise ValueError("colorization: grid, sigma, prior_sigma must be > 0 and head_hidden_dim >= 1")
        if not 1 <= options.target_size <= spec.image_size:
            raise ValueError(f"colorization: target_size must be in [1, image_size={spec.image_size}], got {options.target_size}")
        if not 0.0 <= options.rebalance_mix <= 1.0:
            raise ValueError(f"colorization: rebalance_mix must be in [0, 1], got {options.rebalance_mix}")
        bins = gamut_bins(options.grid)
        if not 1 <= options.neighbours <= len(bins):
            raise ValueError(f"colorization: neighbours must be in [1, {len(bins)}], got {options.neighbours}")
        self.register_buffer("ab_bins", bins)                                      # [Q, 2], saved with the state
        self.register_buffer("bin_counts", torch.zeros(len(bins), dtype=torch.float64))
        width = probe_shapes(self.l_backbone, spec.image_size, channels=1)[0][0]   # unsupported backbones fail here
        self.head = conv_bn_relu(width, options.head_hidden_dim)
        self.classifier = nn.Conv2d(options.head_hidden_dim, len(bins), 1)

    def model_config(self, spec: ObjectiveSpec, options: ColorizationOptions) -> ModelConfig:
        """One 1-channel backbone on the L of Lab, converted in-graph from the usual RGB input."""
        return default_model_config(spec, colour_space="lab", view_channels=[[0]])

    @property
    def l_backbone(self) -> nn.Module:
        """The 1-channel backbone on L (a property, not a second registration of the same weights)."""
        return self.encoder.backbone.encoders[0]

    def views(self) -> ColorizationViews:
        config, o = self.encoder.config, self.options
        return ColorizationViews(config.image_size, config.mean, config.std, self.ab_bins.cpu(), o.target_size,
                                 o.neighbours, o.sigma, o.crop_scale, o.flip)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised RGB [N, 3, S, S] -> (bin logits [N, t*t, Q], the L backbone's map [N, C, h, w])."""
        lightness = self.encoder.backbone.colour(images)[:, :1]                    # in-graph L, as at export
        features = feature_map(self.l_backbone, lightness)
        hidden = F.interpolate(self.head(features), size=(self.options.target_size,) * 2, mode="bilinear",
                               align_corners=False)
        return self.classifier(hidden).flatten(2).transpose(1, 2), features

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits, features = self.predict(batch["image"])
        targets = dense_targets(batch["ab_index"], batch["ab_weight"].float(), len(self.ab_bins))  # [N, P, Q]
        weights = None
        if self.options.rebalance:
            if self.training:
                with torch.no_grad():
                    self.bin_counts += all_reduce_sum(targets.sum(dim=(0, 1)).double())
            prior = smoothed_prior(self.bin_counts, self.ab_bins.double(), self.options.prior_sigma)
            bin_weights = rebalancing_weights(prior, self.options.rebalance_mix).float()
            weights = bin_weights[targets.argmax(dim=-1)]                          # v(Z) = w of the modal bin
        loss = colorization_loss(logits, targets, weights)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets.argmax(-1)).float().mean()
        return {"loss": loss, "bin_accuracy": accuracy, "embedding_std": embedding_std(features.mean(dim=(2, 3)))}
