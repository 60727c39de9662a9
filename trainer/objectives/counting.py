"""Counting (Noroozi, Pirsiavash & Favaro 2017, "Representation Learning by Learning to Count").

A counting feature phi = ReLU(head(encoder(x))) should count visual primitives: the counts of an image equal
the sum of the counts of its 2x2 tiles, and differ from another image's. For each x of the batch:

    l = ||phi(D x) - sum_{i=1..4} phi(T_i x)||^2 + max(0, M - ||phi(D y) - sum_i phi(T_i x)||^2)

with D the 2x downsampling, T_i the four quadrant tiles (each at D's resolution, so the encoder sees one input
size) and y another image of the batch (the batch rolled by one; ``negatives: batch`` averages the hinge over
every other image of the batch, a lower-variance estimate of the same expectation over y). The exported model
is the encoder (phi's head is dropped), evaluated on whole images at ``image_size``.

* Inputs (data workers, per image): a random resized crop + flip rendered at ``crop_size`` px (default
  ``image_size``, so the tiles keep the photo's resolution as the paper's 114 px tiles of a 228 px crop do, and
  D x and the tiles are image_size / 2: 16 px on CIFAR; ``crop_size: 64`` upsamples CIFAR so that they are
  32 px, which measured worse and costs 4x), its four tiles cut with ``Tensor.unfold``-style
  reshapes, and its 2x downsampling with a resampling filter drawn per image from nearest / bilinear / bicubic
  / Lanczos (the paper draws the downsampling method at random so that phi cannot tell D x from tiles by its
  interpolation artefacts).
* phi: the paper's AlexNet conv layers + fc6/fc7/fc8 with ReLU to 1000 counts; here backbone -> ``head_layers``
  (3) Linear-ReLU layers to ``count_dim`` (1000) counts; M = 10 as in the paper.
* One encoder pass over the downsampled images and the tiles together (BN statistics shared). y is another
  image of the same process's batch, so nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from trainer.losses.counting import counting_loss
from trainer.models import relu_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std

FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


@dataclass
class CountingOptions:
    count_dim: int = 1000        # phi's output (the paper's fc8)
    hidden_dim: int = 1024
    head_layers: int = 3         # fc layers after the encoder, each with a ReLU (the paper: AlexNet's fc6-fc8)
    margin: float = 10.0         # M of the contrastive term
    crop_scale: tuple = (0.5, 1.0)
    flip: float = 0.5
    random_filter: bool = True   # draw D's resampling filter per image
    negatives: str = "one"       # y per x: "one" (the paper: the previous image) or "batch" (every other image)
    jitter_each: float = 0.0     # probability of an independent colour jitter per input (grayscale: a fifth of it)
    crop_size: int = 0           # px the crop is rendered at before tiling; 0: image_size (tiles at image_size / 2)


class CountingViews:
    """(PIL image, sample) -> ``downsampled`` [3, S, S] (D x) and ``tiles`` [4, 3, S, S] (T_i x, row-major
    quadrants of the 2S crop), both normalised; S = ``crop_size // 2`` (``size // 2`` when ``crop_size`` is 0)."""

    def __init__(self, size: int, mean, std, crop_scale=(0.5, 1.0), flip: float = 0.5, random_filter: bool = True,
                 crop_size: int = 0, jitter_each: float = 0.0):
        crop_size = crop_size or size
        if crop_size < 2 or crop_size % 2:
            raise ValueError(f"counting: crop_size must be an even number of pixels >= 2, got {crop_size}")
        size = crop_size // 2
        steps = [T.RandomResizedCrop(crop_size, scale=tuple(crop_scale), antialias=True)]
        if flip > 0:
            steps.append(T.RandomHorizontalFlip(flip))
        self.crop = T.Compose(steps)
        self.normalise = T.Normalize(mean, std)
        # Each of the five inputs gets its own colour jitter / grayscale, so that colour histograms (additive over
        # tiles, and different between images) stop being a solution of the loss.
        self.jitter = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=jitter_each),
                                 T.RandomGrayscale(0.2 * jitter_each)]) if jitter_each > 0 else None
        self.size, self.random_filter = size, random_filter

    def __call__(self, image, sample) -> dict:
        crop = self.crop(image.convert("RGB"))                                       # PIL, 2S x 2S
        choice = int(torch.randint(len(FILTERS), ())) if self.random_filter else 2   # bicubic when fixed
        downsampled = TF.to_tensor(crop.resize((self.size, self.size), FILTERS[choice]))
        full = TF.to_tensor(crop)                                                    # [3, 2S, 2S]
        s = self.size
        tiles = full.reshape(3, 2, s, 2, s).permute(1, 3, 0, 2, 4).reshape(4, 3, s, s)  # quadrants, row-major
        if self.jitter is not None:
            downsampled, tiles = self.jitter(downsampled), torch.stack([self.jitter(tile) for tile in tiles])
        return {"downsampled": self.normalise(downsampled), "tiles": self.normalise(tiles)}


@register
class Counting(Objective):
    key = "counting"
    Options = CountingOptions

    def __init__(self, spec: ObjectiveSpec, options: CountingOptions):
        super().__init__(spec, options)
        if options.count_dim < 1 or options.hidden_dim < 1 or options.head_layers < 1 or options.margin <= 0:
            raise ValueError(f"counting: count_dim, hidden_dim and head_layers must be >= 1 and margin > 0, got "
                             f"{options.count_dim}, {options.hidden_dim}, {options.head_layers}, {options.margin}")
        if not 0 <= options.jitter_each <= 1:
            raise ValueError(f"counting: jitter_each is a probability, got {options.jitter_each}")
        if options.negatives not in ("one", "batch"):
            raise ValueError(f"counting: negatives must be 'one' or 'batch', got {options.negatives!r}")
        if options.crop_size < 0 or options.crop_size % 2:
            raise ValueError(f"counting: crop_size must be 0 (image_size) or an even number of pixels, "
                             f"got {options.crop_size}")
        widths = [self.encoder.embed_dim] + [options.hidden_dim] * (options.head_layers - 1) + [options.count_dim]
        self.counter = relu_mlp(widths)  # phi's head: every layer ReLU'd, so the counts are >= 0

    def views(self) -> CountingViews:
        config, o = self.encoder.config, self.options
        return CountingViews(config.image_size, config.mean, config.std, o.crop_scale, o.flip, o.random_filter,
                             o.crop_size, o.jitter_each)

    def counts(self, images: torch.Tensor) -> torch.Tensor:
        """phi: [N, 3, S, S] -> [N, count_dim] non-negative counts."""
        return self.counter(self.encoder.encode_image(images))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        down, tiles = batch["downsampled"], batch["tiles"]
        n, t = tiles.shape[:2]
        counts = self.counts(torch.cat([down, tiles.flatten(0, 1)]))                 # one pass: [N + N*T, D]
        down_counts, tile_counts = counts[:n], counts[n:].view(n, t, -1)
        if self.options.negatives == "batch" and n > 1:                              # y: every other image
            others = (torch.arange(n, device=down.device)[:, None] + torch.arange(1, n, device=down.device)) % n
            other = down_counts[others]                                               # [N, N-1, D]
        else:
            other = down_counts.roll(1, dims=0)                                       # y: the previous image
        loss, counting, contrastive = counting_loss(down_counts, tile_counts, other, self.options.margin)
        return {"loss": loss, "counting_term": counting.detach(), "contrastive_term": contrastive.detach(),
                "mean_count": down_counts.detach().sum(1).mean(), "embedding_std": embedding_std(down_counts)}
