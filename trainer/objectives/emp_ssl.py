"""EMP-SSL (Tong et al. 2023, "EMP-SSL: Towards Self-Supervised Learning in One Training Epoch").

What the paper adds: many fixed-size patches of every image per step (20 to 200; the CIFAR patches are random
crops of a quarter of the image area, 16 x 16 px of 32, resized to the input size, each with its own flip,
colour jitter, grayscale, blur and solarisation), all embedded by backbone -> projector (4096-4096-1024
with BN and ReLU on CIFAR) -> L2 normalisation. The loss maximises, for each patch index p, the total coding
rate R(Z_p) = 1/2 logdet(I + D / (N eps^2) Z_p^T Z_p) of that patch's embeddings over the batch (eps^2 = 0.2),
averaged over patches, plus lambda = 200 times the cosine similarity of each patch embedding to the mean of
its image's patch embeddings (``trainer.losses.coding_rate.emp_ssl``). No momentum network, no stop-gradient.

Implementation choices: the patch recipe is ``ManyViews`` with the crop scale fixed at (0.25, 0.25); its
aspect ratio varies in 3/4-4/3 (torchvision's default) where the authors' crops are square. All patches pass
through the encoder in one batch (the authors' code); the normalised embeddings [n, P, D] are gathered
across processes with gradient, so each coding rate is that of the global batch and 2 processes equal 1.
The exported model is the backbone (the paper evaluates the mean of the patch embeddings of the projector's
first layer; the kNN/linear evaluation here uses the backbone's embedding of the whole image). Logged:
``coding_rate`` (mean over patches), ``patch_similarity`` and ``embedding_std`` of patch 0's embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer.data.views import ManyViews, stack_views, view_configs
from trainer.distributed import gather_with_grad
from trainer.losses.coding_rate import emp_ssl, patch_invariance, total_coding_rate
from trainer.models import projection_mlp

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_at_least, require_non_negative, require_positive

# The authors' CIFAR patches: RandomResizedCrop(32, scale 0.25-0.25), flip, jitter (0.4, 0.4, 0.4, 0.2) with
# p 0.8 (here SimCLR's factors at strength 0.5: hue 0.1), grayscale 0.2, blur 0.1, solarize 0.1.
PAPER_AUGMENT = {"crop_scale": (0.25, 0.25), "jitter_strength": 0.5, "jitter_prob": 0.8, "grayscale_prob": 0.2,
                 "blur_prob": 0.1, "solarize_prob": 0.1}


@dataclass
class EMPSSLOptions:
    num_patches: int = 20              # patches per image (paper: 20 for its one-epoch CIFAR run, up to 200)
    eps_squared: float = 0.2           # eps^2 of the total coding rate (paper 0.2)
    invariance_weight: float = 200.0   # lambda on the patch-to-mean cosine similarity (paper 200)
    projection_dim: int = 1024         # authors' CIFAR projector 4096-4096-1024
    projection_hidden_dim: int = 4096
    projection_layers: int = 3
    augment: dict = field(default_factory=lambda: dict(PAPER_AUGMENT))  # AugmentConfig fields, every patch

    def __post_init__(self):
        require_at_least(self, 2, "num_patches")
        require_at_least(self, 1, "projection_dim", "projection_hidden_dim", "projection_layers")
        require_positive(self, "eps_squared")
        require_non_negative(self, "invariance_weight")
        view_configs(self.augment)  # unknown augmentation fields fail here


@register
class EMPSSL(Objective):
    key = "emp_ssl"
    Options = EMPSSLOptions

    def __init__(self, spec: ObjectiveSpec, options: EMPSSLOptions):
        super().__init__(spec, options)
        self.projector = projection_mlp(self.encoder.embed_dim, options.projection_hidden_dim, options.projection_dim,
                                        options.projection_layers)

    def views(self) -> ManyViews:
        return self.many_views(self.options.num_patches)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        patches = stack_views(batch, self.options.num_patches)  # [n, P, C, H, W]
        n, p = patches.shape[:2]
        z = F.normalize(self.projector(self.encoder.encode_image(patches.flatten(0, 1))), dim=-1).view(n, p, -1)
        z_global = gather_with_grad(z)
        loss = emp_ssl(z_global, self.options.eps_squared, self.options.invariance_weight)
        with torch.no_grad():  # the two terms again, for the log
            rate = total_coding_rate(z_global.transpose(0, 1), self.options.eps_squared).mean()
            similarity = patch_invariance(z_global)
        return {"loss": loss, "coding_rate": rate, "patch_similarity": similarity,
                "embedding_std": embedding_std(z[:, 0])}
