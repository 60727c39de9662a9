"""VICRegL (Bardes, Ponce & LeCun 2022, "VICRegL: Self-Supervised Learning of Local Visual Features").

VICReg applied twice: on the pooled feature of every crop (global expander: 3 linear layers, BN + ReLU between,
8192 wide in the paper) and on every cell of the backbone's last feature map (map expander, the same shape,
512 wide, run on each cell). Loss = alpha * global + (1 - alpha) * local, alpha 0.75.

* Global (``trainer.losses.vicreg.vicregl_global``): invariance between each of the 2 global crops and every
  other crop (locals included), variance and covariance of every crop's embeddings, averaged.
* Local (``vicregl_local``), for each global crop i and every other crop j: the cells of i and j are matched
  (a) by feature: each cell's nearest cell of the other map in L2 distance (all cells kept, the authors'
  ``l2_all_matches``), and (b) by location: each cell's nearest cell in original-image coordinates, computed
  from the crops' boxes and flips (``trainer.data.multicrop_geometry``: every crop carries its geometry), the
  ``num_matches`` closest pairs kept (20 / 4 on the paper's 7 x 7 maps); VICReg terms on the matched sets, both
  directions; averaged over the crop pairs.
* Multi-crop: 2 global crops + V local crops (paper 224 px scale 0.4-1 and 6 x 96 px scale 0.08-0.4; here the
  image size and ``local_crop_size``).

Implementation choices: one backbone pass per crop gives both its map (``trainer.models.dense.feature_map``)
and its global feature, the spatial mean of that map, which is exactly the pooled feature of cnn-small and the
ResNets (for a ViT it is the mean patch token, not the class token it exports). The embeddings and cell
embeddings are gathered from every process with gradient (cell centres without) before the loss, so every
variance and covariance is the GLOBAL batch's (the authors' ``gather_center``) and 2 processes equal 1. Local
terms are accumulated over all crop pairs (the published ``local_loss`` overwrites them in its loop, keeping
only the last pair; the corrected accumulation is what the authors' later code and lightly do). The location
match uses the true flipped geometry (the authors' default ``no_flip_grid`` ignores flips). The expanders' last
layers have no bias (the authors' ``MLP``). Global-crop colour augmentation is symmetric here (no solarize).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.data.crop_geometry import PhotometricConfig, cell_centres
from trainer.data.multicrop import accepted_local_size
from trainer.data.multicrop_geometry import MultiCropGeometryViews
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.vicreg import VICRegTerms, vicregl_global, vicregl_local
from trainer.models import projection_mlp
from trainer.models.dense import cells, feature_map, probe_shapes

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least, require_in_range, require_non_negative, require_positive


@dataclass
class VICRegLOptions:
    alpha: float = 0.75                    # weight of the global term; 1 - alpha on the local term (paper 0.75)
    invariance_weight: float = 25.0        # lambda (global and local)
    variance_weight: float = 25.0          # mu
    covariance_weight: float = 1.0         # nu
    eps: float = 1e-4                      # inside sqrt(Var + eps)
    projection_dim: int = 8192             # global expander output (paper 8192)
    projection_hidden_dim: int = 8192      # global expander hidden width (paper 8192)
    projection_layers: int = 3             # global expander linear layers (paper 3)
    map_projection_dim: int = 512          # map (per-cell) expander output (paper 512)
    map_projection_hidden_dim: int = 512   # map expander hidden width (paper 512)
    map_projection_layers: int = 3         # map expander linear layers (paper 3)
    num_matches: list = field(default_factory=lambda: [20, 4])  # location matches kept: global->other, other->global
    l2_all_matches: bool = True            # feature matching keeps every cell (paper); False: num_matches too
    num_local_crops: int = 6               # paper 6
    local_crop_size: int = 16              # paper 96 px next to 224 px global crops
    global_crop_scale: tuple = (0.4, 1.0)  # paper 0.4-1
    local_crop_scale: tuple = (0.08, 0.4)  # paper 0.08-0.4
    augment: dict = field(default_factory=lambda: {"flip": 0.5, "jitter_strength": 0.5, "jitter_prob": 0.8,
                                                   "grayscale_prob": 0.2, "blur_prob": 0.0})  # flip + colour

    def __post_init__(self):
        require_in_range(self, 0.0, 1.0, "alpha")
        require_non_negative(self, "invariance_weight", "variance_weight", "covariance_weight")
        require_positive(self, "eps")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers", "map_projection_dim",
                         "map_projection_hidden_dim", "map_projection_layers", "local_crop_size")
        require_at_least(self, 0, "num_local_crops")
        if len(self.num_matches) != 2 or any(int(k) < 1 for k in self.num_matches):
            raise ValueError(f"num_matches must be two counts >= 1 (global -> other, other -> global), "
                             f"got {self.num_matches}")
        self.num_matches = [int(k) for k in self.num_matches]
        for name in ("global_crop_scale", "local_crop_scale"):
            scale = getattr(self, name)
            if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]) <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {scale}")
        self.photometric()  # unknown augmentation fields fail here

    def photometric(self) -> PhotometricConfig:
        colour = {k: v for k, v in self.augment.items() if k != "flip"}
        known = set(PhotometricConfig.__dataclass_fields__)
        if set(colour) - known:
            raise ValueError(f"augment: unknown key(s) {sorted(set(colour) - known)}; "
                             f"known: {sorted(known | {'flip'})}")
        if not 0.0 <= float(self.augment.get("flip", 0.5)) <= 1.0:
            raise ValueError(f"augment.flip must be a probability, got {self.augment['flip']}")
        return PhotometricConfig(**colour)


@register
class VICRegL(Objective):
    key = "vicregl"
    Options = VICRegLOptions

    def __init__(self, spec: ObjectiveSpec, options: VICRegLOptions):
        super().__init__(spec, options)
        width = probe_shapes(self.encoder.backbone, spec.image_size)[0][0]  # unsupported backbones fail here
        self.local_crop_size = accepted_local_size(self.encoder.backbone, spec.image_size, options.local_crop_size,
                                                   self.encoder.config.channels)
        self.crop_keys = [f"global{i}" for i in range(2)] + [f"local{i}" for i in range(options.num_local_crops)]
        # As the authors: each expander exists only when its term has weight.
        if options.alpha > 0:
            self.projector = projection_mlp(width, options.projection_hidden_dim, options.projection_dim,
                                            options.projection_layers)
            self.projector[-1].register_parameter("bias", None)
        if options.alpha < 1:
            self.map_projector = projection_mlp(width, options.map_projection_hidden_dim, options.map_projection_dim,
                                                options.map_projection_layers)
            self.map_projector[-1].register_parameter("bias", None)

    def views(self) -> MultiCropGeometryViews:
        config, o = self.encoder.config, self.options
        return MultiCropGeometryViews(config.image_size, self.local_crop_size, config.mean, config.std,
                                      o.num_local_crops, o.global_crop_scale, o.local_crop_scale,
                                      flip=float(o.augment.get("flip", 0.5)), colour=o.photometric())

    def _local_terms(self, maps: list[torch.Tensor], centres: list[torch.Tensor]) -> VICRegTerms:
        """VICRegL's local term averaged over the pairs (global crop i, any other crop j)."""
        o = self.options
        pairs = [(i, j) for i in range(2) for j in range(len(maps)) if j != i]
        l2_counts = (None, None) if o.l2_all_matches else o.num_matches
        terms = [vicregl_local(maps[i], maps[j], centres[i], centres[j], o.num_matches, l2_counts,
                               o.invariance_weight, o.variance_weight, o.covariance_weight, o.eps) for i, j in pairs]
        return VICRegTerms(*(torch.stack(values).mean() for values in zip(*terms)))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        o = self.options
        embeddings, maps, centres = [], [], []
        for key in self.crop_keys:  # one backbone pass per crop
            fmap = feature_map(self.encoder.backbone, batch[key])  # [n, C, h, w]
            n, channels, height, width = fmap.shape
            if o.alpha > 0:
                embeddings.append(gather_with_grad(self.projector(fmap.mean(dim=(2, 3)))))
            if o.alpha < 1:
                per_cell = self.map_projector(cells(fmap).reshape(n * height * width, channels))
                maps.append(gather_with_grad(per_cell.view(n, height * width, -1)))
                centres.append(gather_no_grad(cell_centres(batch[f"box_{key}"], batch[f"flip_{key}"], height, width)))
        outputs: dict[str, torch.Tensor] = {}
        loss = 0.0
        if o.alpha > 0:
            global_terms = vicregl_global(embeddings, o.invariance_weight, o.variance_weight, o.covariance_weight,
                                          o.eps)
            loss = loss + o.alpha * global_terms.loss
            outputs.update(global_loss=global_terms.loss.detach(), invariance=global_terms.invariance.detach(),
                           variance=global_terms.variance.detach(), covariance=global_terms.covariance.detach())
        if o.alpha < 1:
            local_terms = self._local_terms(maps, centres)
            loss = loss + (1 - o.alpha) * local_terms.loss
            outputs.update(local_loss=local_terms.loss.detach(), local_invariance=local_terms.invariance.detach(),
                           local_variance=local_terms.variance.detach(),
                           local_covariance=local_terms.covariance.detach())
        monitored = embeddings[0] if embeddings else maps[0].reshape(-1, maps[0].shape[-1])
        outputs.update(loss=loss, embedding_std=embedding_std(monitored))
        return outputs
