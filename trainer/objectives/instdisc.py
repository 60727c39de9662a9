"""InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination").

Every training image is its own class. A memory bank holds one L2-normalised 128-d feature per training
sample, indexed by the sample's dense slot ``batch["id"]`` (0..n-1, numbered by the loop on any shards:
``dense_sample_ids``); each step scores the batch's features against their own bank entries (positives) and m = 4096 entries drawn uniformly from the bank (noise), with binary NCE whose
normalising constant Z is estimated once from the first batch and then fixed (paper eq. 7). The loss adds the
proximal regulariser λ‖v_i^(t) - v_i^(t-1)‖² (λ = 30), and after every optimizer step the batch's bank rows
move to normalize(η v + (1 - η) f) with η = 0.5. The 128-d feature is the exported embedding (the paper's
kNN feature): a linear layer after the backbone, kept in ``EmbeddingModel.image_projection``.

Bank, Z, the step count and the "seen" marks are buffers, so checkpoints carry them and ``--resume`` restores
them. With several processes every rank's bank receives the gathered features and ids of the whole global
batch, so the banks stay identical. Implementation choices: m is capped at bank size - 1 for small banks; the
proximal term is applied only to instances already written to the bank once (before that v^(t-1) does not
exist, only the bank's random initialisation); ``normaliser_warmup_steps`` (default 0 = the paper)
re-estimates Z on every batch until that step and only then fixes it: the first batch scores a random bank,
and once the bank holds the network's (strongly correlated) features that Z is orders of magnitude too small,
which saturates h(i, v_i) and silences the positive term in short runs (observed: the NCE loss grows from
~140 to ~1100 over 400 steps on 2,000 images); ``loss`` switches to another InfoNCE-family loss over the same
bank negatives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from trainer.data.views import AugmentConfig, augmentation
from trainer.distributed import all_reduce_sum, gather_no_grad, world_size
from trainer.losses.memory_bank import estimate_normaliser, momentum_update, proximal_penalty
from trainer.losses.nce_family import contrastive_loss_from_similarities
from trainer.models import ModelConfig

from .base import Objective, ObjectiveSpec, default_model_config, register
from .options import InfoNCEOptions

SLOTS_HINT = (
    "memory-bank objectives index their bank by the dense slot 0..n-1 that the training loop gives every sample "
    "(trainer.data.slots: numbered by shard and key when the run starts); ids outside it come from elsewhere "
    "(a batch made by hand, or the bank sized for fewer samples than the data holds)"
)


@dataclass
class InstDiscOptions(InfoNCEOptions):
    projection_dim: int = 128       # bank feature size (the paper's 128-d; exported: the model's image_projection)
    temperature: float = 0.07       # tau
    num_noise: int = 4096           # m noise samples per query (capped at bank size - 1)
    bank_momentum: float = 0.5      # eta in v <- normalize(eta v + (1 - eta) f)
    proximal_weight: float = 30.0   # lambda of the proximal regulariser
    normaliser_warmup_steps: int = 0  # fix Z at the first batch after this many steps (paper: 0); before, per batch
    loss: str = "nce"               # nce (paper) | infonce | flatnce | debiased | hcl over the bank's samples
    # nce's noise_probability / normaliser: None (default) = the paper's 1 / n and Z estimated (see above)
    augment: dict = field(default_factory=lambda: {  # the paper's CIFAR augmentation (crop, jitter, grey, flip)
        "crop_scale": (0.2, 1.0), "jitter_strength": 0.5, "jitter_prob": 1.0, "grayscale_prob": 0.2})

    ALIASES: ClassVar[dict[str, str]] = {"feature_dim": "projection_dim"}


class OneView:
    """One augmented view ``view0`` per image (InstDisc compares it with the bank, not with a second view)."""

    def __init__(self, size: int, mean, std, config: AugmentConfig):
        self.transform = augmentation(size, mean, std, config)

    def __call__(self, image, sample) -> dict:
        return {"view0": self.transform(image)}


@register
class InstDisc(Objective):
    key = "instdisc"
    Options = InstDiscOptions
    dense_sample_ids = True  # batch["id"]: the sample's dense slot 0..n-1 (trainer.data.slots)

    def __init__(self, spec: ObjectiveSpec, options: InstDiscOptions):
        super().__init__(spec, options)
        if not spec.num_train_samples or spec.num_train_samples < 2:
            raise ValueError(f"instdisc needs the number of training samples (>= 2) for its memory bank, got {spec.num_train_samples}")
        self.num_data = int(spec.num_train_samples)
        self.num_noise = min(options.num_noise, self.num_data - 1)
        # The paper initialises the bank randomly; unit rows so that every score is a cosine from the start.
        self.register_buffer("bank", F.normalize(torch.randn(self.num_data, options.projection_dim), dim=1))
        self.register_buffer("seen", torch.zeros(self.num_data, dtype=torch.uint8))  # uint8: gloo broadcasts it
        self.register_buffer("normaliser", torch.tensor(-1.0))  # Z; < 0 until estimated and fixed
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # optimizer steps seen (Z warm-up)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._normaliser_known = False  # avoids reading the Z buffer (a device sync) on every step

    def model_config(self, spec: ObjectiveSpec, options: InstDiscOptions) -> ModelConfig:
        return default_model_config(spec, image_projection=options.projection_dim)

    def views(self) -> OneView:
        config = self.encoder.config
        return OneView(config.image_size, config.mean, config.std, AugmentConfig(**self.options.augment))

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_data):
            raise ValueError(f"instdisc: sample id {int(ids.max())} (min {int(ids.min())}) is outside the memory bank "
                             f"of {self.num_data} training samples; {SLOTS_HINT}")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ids = batch["id"]
        self._check_ids(ids)
        features = F.normalize(self.encoder.encode_image(batch["view0"]), dim=1)
        with torch.no_grad():
            previous = self.bank[ids]  # v_i^(t-1); indexing copies, so the bank update cannot touch the graph
            noise_ids = torch.randint(self.num_data, (ids.shape[0], self.num_noise), device=ids.device)
        positive = (features * previous).sum(dim=1)
        if self.num_data <= self.num_noise * self.options.projection_dim:
            # Small banks (CIFAR: 50k rows): scoring every row and picking the noise columns is cheaper than
            # gathering an [N, m, D] block of rows.
            noise = (features @ self.bank.t()).gather(1, noise_ids)
        else:
            noise = torch.einsum("nd,nmd->nm", features, self.bank[noise_ids])
        normaliser = self.normaliser
        if not self._normaliser_known:
            if self.normaliser.item() < 0:  # not fixed yet, nor restored from a checkpoint
                # Z from this batch (paper eq. 7); the mean over processes is the estimate on the global batch,
                # identical on every rank. Fixed at the first training batch after the warm-up (paper: the first).
                local = estimate_normaliser(noise, self.num_data, self.options.temperature)
                normaliser = all_reduce_sum(local.clone()) / world_size()
                if self.training and int(self.steps_done) >= self.options.normaliser_warmup_steps:
                    self.normaliser.fill_(float(normaliser))
                    self._normaliser_known = True
            else:
                self._normaliser_known = True
        kind = self.options.loss
        extra = self.options.loss_options()
        if kind == "nce":  # the paper's: uniform noise over the n bank rows, Z as estimated above
            o = self.options
            extra = {"noise_probability": 1.0 / self.num_data if o.noise_probability is None else o.noise_probability,
                     "normaliser": normaliser if o.normaliser is None else o.normaliser}
        contrast = contrastive_loss_from_similarities(kind, positive, noise, self.options.temperature, **extra)
        proximal = proximal_penalty(features, previous, self.seen[ids].bool())
        if self.training:
            self._pending = (ids.detach(), features.detach())
        return {"loss": contrast + self.options.proximal_weight * proximal, "contrast": contrast.detach(),
                "proximal": proximal.detach(), "positive_cos": positive.detach().mean()}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Write this step's features into the bank (all processes' rows, so every bank stays identical)."""
        self.steps_done += 1
        if self._pending is None:
            return
        ids, features = self._pending
        self._pending = None
        ids, features = gather_no_grad(ids), gather_no_grad(features.to(self.bank.dtype))
        self.bank[ids] = momentum_update(self.bank[ids], features, self.options.bank_momentum)
        self.seen[ids] = 1
