"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles").

The data workers cut each image (a random crop, rescaled to ``puzzle_size``) into a 3x3 grid of tiles with a
gap and a random jitter per tile, and normalise every tile on its own (``TileGridView``). In ``forward`` each
image of the batch draws one permutation from a fixed set and its tiles are shuffled by it (one batched
``gather``); the run's backbone, shared by all tiles (a siamese "context-free network"), encodes the 9N tiles in
one pass; each tile's feature goes through a per-tile layer (the paper's fc6), the nine are concatenated in
position order and an MLP (fc7, fc8) classifies which permutation of the set was applied.

The permutation set is chosen by maximal Hamming distance (``hamming_permutation_set``: greedy, seeded, size
configurable, default 100 as the paper) and kept as a registered buffer, so it is in every checkpoint and a
resumed run uses the set it was trained with. ``permutation_selection: min`` (default) adds, at each step, the
candidate whose distance to its nearest chosen permutation is largest (max-min); ``sum`` is the paper's
Algorithm 1 literally (largest summed distance). The exported encoder is the tile encoder (the backbone),
evaluated on whole images.

Implementation choices at CIFAR scale: puzzle 64 px (the 32 px image upsampled), tiles 18 px with a 3 px gap
and +-1 px jitter (the paper: 64 px tiles in 75 px cells of a 225 px crop, a gap of up to 11 px). Tiles of
other sizes than the image need a backbone that accepts any input size (CNNs); ViT backbones are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.pretext_inputs import TileGridView, hamming_permutation_set, permute_tiles
from trainer.losses.pretext import pretext_accuracy, pretext_classification_loss
from trainer.models import linear_bn_relu, projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least


@dataclass
class JigsawOptions:
    num_permutations: int = 100        # size of the permutation set (the paper: 100; 1000 in its ablation)
    permutation_selection: str = "min"  # min (max-min Hamming distance) | sum (the paper's Algorithm 1)
    permutation_seed: int = 0          # the set is a function of (size, selection, seed)
    grid: int = 3                      # grid x grid tiles
    puzzle_size: int = 64              # the crop is rescaled to this before cutting (32 px CIFAR upsampled)
    tile: int = 18                     # tile side in px
    gap: int = 3                       # px between neighbouring tiles before jitter
    jitter: int = 1                    # random shift of each tile, +- px per axis
    crop_scale: tuple[float, float] = (0.6, 1.0)
    grayscale_prob: float = 0.0
    per_tile_normalisation: bool = True  # each tile to zero mean / unit std per channel (the paper)
    tile_dim: int = 256                # per-tile layer (fc6) width
    head_hidden_dim: int = 1024        # fc7 width

    def __post_init__(self) -> None:
        require_at_least(self, 2, "grid")
        require_at_least(self, 1, "tile_dim", "head_hidden_dim")
        if self.permutation_selection not in ("min", "sum"):
            raise ValueError(f"jigsaw: permutation_selection must be 'min' or 'sum', got {self.permutation_selection!r}")


def refuse_fixed_size_backbone(encoder, key: str) -> None:
    """Tile objectives feed the backbone tiles smaller than the image: ViTs (fixed patch grids) cannot take them."""
    if hasattr(encoder.backbone, "patch_embed"):
        raise ValueError(f"{key}: encodes tiles smaller than the image, which a ViT backbone with a fixed patch "
                         f"grid cannot take; use a CNN backbone (cnn-small, resnet18-cifar, ...)")


@register
class Jigsaw(Objective):
    key = "jigsaw"
    Options = JigsawOptions

    def __init__(self, spec: ObjectiveSpec, options: JigsawOptions):
        super().__init__(spec, options)
        refuse_fixed_size_backbone(self.encoder, self.key)
        tiles = options.grid ** 2
        self.register_buffer("permutations", hamming_permutation_set(
            tiles, options.num_permutations, options.permutation_seed, options.permutation_selection))
        self.views()  # tile geometry errors at build time, not in a data worker
        self.tile_head = linear_bn_relu(self.encoder.embed_dim, options.tile_dim)  # fc6, per tile
        # fc7 (Linear-BN-ReLU) and fc8 on the nine tiles concatenated in position order
        self.classifier = projection_mlp(tiles * options.tile_dim, options.head_hidden_dim, options.num_permutations)

    def views(self) -> TileGridView:
        o, config = self.options, self.encoder.config
        return TileGridView(o.puzzle_size, o.grid, o.tile, o.gap, o.jitter, config.mean, config.std, o.crop_scale,
                            o.grayscale_prob, o.per_tile_normalisation)

    def model_card_extras(self) -> dict:
        """The permutation set goes into RUN/model/config.json: the classifier's classes mean nothing without it."""
        return {"jigsaw_permutations": self.permutations.tolist()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        tiles = batch["tiles"]  # [N, T, C, t, t] in grid order
        n, count = tiles.shape[:2]
        labels = torch.randint(self.permutations.shape[0], (n,), device=tiles.device)
        shuffled = permute_tiles(tiles, self.permutations[labels])
        features = self.encoder.encode_image(shuffled.flatten(0, 1))  # shared tile encoder, one pass over N*T
        logits = self.classifier(self.tile_head(features).reshape(n, -1))  # tiles concatenated in position order
        return {"loss": pretext_classification_loss(logits, labels), "accuracy": pretext_accuracy(logits, labels),
                "embedding_std": embedding_std(features)}
