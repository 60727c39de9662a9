"""PatchNCE (Park, Efros, Zhang & Zhu 2020, "Contrastive Learning for Unpaired Image-to-Image Translation", CUT)
used as a self-supervised objective.

CUT contrasts the encoder features of an input image and of its translation: a location of one is pulled to
the same location of the other and pushed from the other sampled locations of that image. Here the pair is
two views of one image with the *same* crop and flip and independent photometric changes (colour jitter,
grayscale): like CUT's input and output, they differ in appearance and agree in geometry, so "the same
location" is exact, cell for cell, at every layer and resolution. (Crops with different geometry would put
the cells of the two views at different positions and scales: that is PixPro's setting, see ``pixpro``.)

For each layer in ``layers`` (backbone stages, negative from the end; CUT uses five encoder layers): the map
[N, C, h, w] -> S = ``num_patches`` locations sampled once per layer and shared by the batch and both views
(CUT's ``PatchSampleF``; all h*w when fewer) -> a 2-layer MLP per layer (Linear-ReLU-Linear, 256 wide) ->
PatchNCE with temperature 0.07, the key side detached (CUT's loss does ``feat_k.detach()``). Both views take
the query role in turn (the two directions are averaged) and the layers' losses are averaged (CUT's
``calculate_NCE_loss``). ``batch_negatives`` adds the other images' locations as negatives (CUT's
``nce_includes_all_negatives_from_minibatch``); it scores (N S)^2 pairs per layer, so keep N x S to a few
thousand. Negatives stay within each process's batch: nothing is gathered. The exported model is the usual
globally pooled backbone.

Measured on CIFAR-10 (cnn-small, batch 64): with CUT's same-image negatives the task is solved almost at once
(the last stage's loss is 0.002 after 25 steps: with shared geometry a location can be told from the others
by where it is, since padding gives CNN features a position), so the image-level feature barely moves;
``batch_negatives`` makes the locations of other images negatives too, which the position cannot solve.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.data.crop_geometry import CropGeometryViews, crop_geometry_views
from trainer.losses.dense import patch_nce
from trainer.models import mlp_head
from trainer.models.dense import cells, feature_maps, probe_shapes, resolve_stages

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std


@dataclass
class PatchNCEOptions:
    layers: list = field(default_factory=lambda: [-3, -2, -1])  # backbone stages; negative counts from the end
    num_patches: int = 256         # S locations per layer (CUT 256)
    mlp_dim: int = 256             # CUT's netF width
    temperature: float = 0.07      # CUT's nce_T
    batch_negatives: bool = False  # other images' locations as negatives too
    detach_key: bool = True        # CUT: no gradient through the key side
    augment: dict = field(default_factory=lambda: {"crop_scale": (0.2, 1.0), "flip": 0.5, "jitter_strength": 0.5,
                                                   "jitter_prob": 0.8, "grayscale_prob": 0.2, "blur_prob": 0.0})


@register
class PatchNCE(Objective):
    key = "patchnce"
    Options = PatchNCEOptions

    def __init__(self, spec: ObjectiveSpec, options: PatchNCEOptions):
        super().__init__(spec, options)
        if not options.layers:
            raise ValueError("patchnce: layers must name at least one backbone stage")
        if options.num_patches < 2 or options.temperature <= 0:
            raise ValueError(f"patchnce: num_patches must be >= 2 and temperature > 0, got {options.num_patches}, "
                             f"{options.temperature}")
        crop_geometry_views(spec.image_size, [0.0] * 3, [1.0] * 3, options.augment, shared_geometry=True)  # bad keys fail here
        shapes = probe_shapes(self.encoder.backbone, spec.image_size, list(options.layers))  # bad stages fail here
        self.stages = resolve_stages(self.encoder.backbone, list(options.layers))
        self.heads = nn.ModuleList([mlp_head(c, options.mlp_dim, options.mlp_dim) for c, _, _ in shapes])  # CUT's netF

    def views(self) -> CropGeometryViews:
        config = self.encoder.config
        return crop_geometry_views(config.image_size, config.mean, config.std, self.options.augment, shared_geometry=True)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        maps = [feature_maps(self.encoder.backbone, batch[v], self.stages) for v in ("view0", "view1")]  # a pass per view
        losses = []
        for index, head in enumerate(self.heads):
            locations = cells(maps[0][index]).shape[1]
            # One random subset of locations per layer, shared by the batch and both views (CUT's sampler).
            ids = torch.randperm(locations, device=maps[0][index].device)[:min(self.options.num_patches, locations)]
            projected = [head(cells(m[index])[:, ids]) for m in maps]          # [N, S, mlp_dim] per view
            keys = [p.detach() for p in projected] if self.options.detach_key else projected
            losses.append(0.5 * (patch_nce(projected[0], keys[1], self.options.temperature, self.options.batch_negatives)
                                 + patch_nce(projected[1], keys[0], self.options.temperature, self.options.batch_negatives)))
        last = projected[0]
        return {"loss": torch.stack(losses).mean(), "embedding_std": embedding_std(last.reshape(-1, last.shape[-1])),
                **{f"loss_stage{stage}": value.detach() for stage, value in zip(self.stages, losses)}}
