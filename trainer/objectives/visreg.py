"""VISReg (Wu et al. 2026, arXiv 2606.02572; lightly 1.6's ``VISRegLoss``).

What the paper adds to LeJEPA (``lejepa.py``: same multi-crop views, projector and prediction of the global
views' mean from every view): the Gaussian regulariser is split into three decoupled terms on each view's
projections, (1) centre: the squared batch mean, (2) scale: (1 - per-dimension std)^2, whose gradient stays
finite as the embeddings collapse, where characteristic-function sketching loses its signal, and (3) shape: the
sliced 2-Wasserstein distance between the projections, standardised with a stop-gradient on the std (so shape
leaves scale to term 2), on M random unit directions and the N(0, 1) quantiles at i / (N + 1)
(``trainer.losses.sigreg``). Loss = (1 - lambda) prediction + lambda (w_c centre + w_s scale + w_h shape),
lambda 0.9 and unit weights (the paper's ImageNet setting; it recommends lambda 0.6 on small data sets).

Implementation choices: the paper lets each device draw its own slices and regularise its own batch (no
communication; M x world slices in effect). Here the projections are gathered with gradient and every term,
the prediction included, is computed over the GLOBAL batch with the step-seeded directions LeJEPA uses (the
same on every process), so 2 processes give the loss and gradients of 1 on the concatenated batch; raise
``num_slices`` for more slices. The loss runs in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.data.multicrop import MultiCropOptions
from trainer.distributed import gather_with_grad
from trainer.losses.sigreg import visreg

from .base import register
from .diagnostics import embedding_std
from .lejepa import SketchedMultiCrop, validate_sketch_options
from .options import require_in_range, require_non_negative, require_positive


@dataclass
class VISRegOptions(MultiCropOptions):
    lambd: float = 0.9                 # lambda, the regulariser's share of the loss (paper 0.9; 0.6 on small data)
    center_weight: float = 1.0         # weight of the centre term inside the regulariser (paper 1)
    scale_weight: float = 1.0          # weight of the scale term (paper 1)
    shape_weight: float = 1.0          # weight of the shape term (paper 1; more for long-tailed or low-rank data)
    num_slices: int = 4096             # M random directions per step for the shape term (paper 4096)
    eps: float = 1e-4                  # added to the std before standardising (shape term)
    projection_dim: int = 64           # projector as LeJEPA's (the paper builds on LeJEPA's code)
    projection_hidden_dim: int = 2048
    projection_layers: int = 3
    num_global_crops: int = 2          # V_g
    num_local_crops: int = 8           # V_l

    def __post_init__(self):
        require_in_range(self, 0.0, 1.0, "lambd")
        require_non_negative(self, "center_weight", "scale_weight", "shape_weight")
        require_positive(self, "eps")
        validate_sketch_options(self)


@register
class VISReg(SketchedMultiCrop):  # views, projector, step-seeded directions: LeJEPA's
    key = "visreg"
    Options = VISRegOptions

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z, num_global = self.projections(batch)
        global_z = gather_with_grad(z.transpose(0, 1).contiguous()).transpose(0, 1)  # [V, B, D]
        if global_z.shape[1] < 2:
            raise ValueError("visreg needs a global batch of at least 2 images (a std and a sorted sample)")
        o = self.options
        terms = visreg(global_z, num_global, self.directions(z), o.lambd, o.center_weight, o.scale_weight,
                       o.shape_weight, o.eps)
        return {"loss": terms.total, "prediction": terms.prediction, "center": terms.center, "scale": terms.scale,
                "shape": terms.shape, "embedding_std": embedding_std(z[0])}
