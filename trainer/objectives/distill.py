"""Distillation from any teacher (LightlyTrain's ``distillation`` method; Hinton et al. 2015 as background).

The method is LightlyTrain's (docs: "Distillation", lightly-train ``_methods/distillationv3``): one strongly
augmented view of each image goes to both the frozen teacher and the student (mixed up first with a shuffled copy of
the batch, lambda ~ U(0, 1)); a linear head (truncated-normal init, std 0.02; dropped at export) projects the
student's embedding to the teacher's width; both are L2-normalised; the teacher embeddings of recent batches form a
queue of pseudo class weights, and the loss is the KL divergence of the student's softmax over the queue from the
teacher's (temperature 0.07; ``trainer.losses.distill``). Only the student's ``EmbeddingModel`` is saved.

Which version: ``method="distillation"`` is ``distillationv3`` since LightlyTrain 0.15.0 (v2 was the default from
0.7.0): the queue-based global loss of v1 plus a local loss on the teacher's spatial feature maps. A teacher here is
whatever the user exported or saved, which gives one embedding per image and no feature maps, so the global term is
what this objective computes: v3's global loss, which is v1's loss. The local term is left out, not approximated.

The teacher (``teacher=PATH``, ``trainer.teacher``): an exported ONNX encoder directory (run by onnxruntime, no torch
needed for it), a manyview ``RUN/model`` directory, or a timm / torchvision / open_clip weights file with
``teacher_backbone``. It keeps its own input contract: the data workers make the student's view once, normalised
for the student; the objective undoes the student's normalisation and the teacher resizes (when its image size
differs) and normalises the pixels its own way (mean/std, or uint8 NHWC).

Choices and deviations:
* The queue holds the teacher embeddings of the global batch (gathered from every process; the same queue on every
  rank) and the loss is taken over the global batch on every rank, so 2 processes compute what 1 process computes on
  the concatenated batch; LightlyTrain keeps one queue per GPU. The queue is updated before the loss, as LightlyTrain
  does (the current batch is among the pseudo classes). Its rows, pointer and fill count are buffers: checkpoints
  carry them and ``--resume`` restores them.
* Rows of the queue not yet written are left out of the softmax; LightlyTrain starts from a zero queue whose unwritten
  rows act as extra logit-0 classes in the first steps.
* Mixup pairs images within each process's batch (as LightlyTrain, per GPU); ``mixup: false`` turns it off.
* ``queue_size: auto`` is LightlyTrain's table from the training-set size (16 below 50 images ... 8192 from 20k);
  8192 when the size is unknown.
* Augmentation: LightlyTrain's (random resized crop 0.14-1, flip, colour jitter p 0.8 at strength 0.5, grayscale 0.2;
  its blur has sigma <= 0.1, a no-op at 32 px, so none) in ``AugmentConfig`` terms, whose jitter has saturation 0.4
  where LightlyTrain's has 0.2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.views import AugmentConfig, OneView
from trainer.distributed import gather_no_grad, gather_with_grad
from trainer.losses.distill import queue_distillation_loss
from trainer.teacher import load_teacher

from .base import Objective, ObjectiveSpec, register
from .diagnostics import embedding_std
from .options import require_positive

# LightlyTrain's queue size by training-set size (DistillationArgs.resolve_auto): the first row whose bound exceeds it.
QUEUE_SIZE_BY_DATASET = ((50, 16), (100, 32), (250, 64), (500, 128), (1_000, 256), (2_000, 512), (4_000, 1024),
                         (10_000, 2048), (20_000, 4096))
LARGEST_QUEUE = 8192


def auto_queue_size(num_samples: int | None) -> int:
    """LightlyTrain's ``queue_size="auto"``: about a quarter to half of the training set, 8192 at most."""
    if num_samples is None:
        return LARGEST_QUEUE
    return next((size for bound, size in QUEUE_SIZE_BY_DATASET if num_samples < bound), LARGEST_QUEUE)


def lightly_augment() -> dict:
    return {"crop_scale": [0.14, 1.0], "flip": 0.5, "jitter_strength": 0.5, "jitter_prob": 0.8,
            "grayscale_prob": 0.2, "blur_prob": 0.0}


@dataclass
class DistillOptions:
    teacher: str | None = None  # ONNX encoder directory, RUN/model directory, or weights file (+ teacher_backbone)
    teacher_backbone: str | None = None  # weights-file teachers: the backbone the file was written for
    teacher_image_size: int | None = None  # weights-file teachers: their input size (default: the student's)
    temperature: float = 0.07  # LightlyTrain's, of both softmaxes over the queue
    queue_size: int | str = "auto"  # teacher embeddings kept as pseudo classes; auto: LightlyTrain's table
    mixup: bool = True  # LightlyTrain mixes each batch with a shuffled copy of itself, lambda ~ U(0, 1)
    augment: dict = field(default_factory=lightly_augment)  # AugmentConfig fields of the one view

    def __post_init__(self):
        require_positive(self, "temperature")
        if self.queue_size != "auto" and (isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int)
                                          or self.queue_size < 1):
            raise ValueError(f"queue_size must be 'auto' or an integer >= 1, got {self.queue_size!r}")
        if self.teacher_image_size is not None and (not isinstance(self.teacher_image_size, int)
                                                    or self.teacher_image_size < 1):
            raise ValueError(f"teacher_image_size must be an integer >= 1, got {self.teacher_image_size!r}")
        if self.teacher is not None and not isinstance(self.teacher, str):
            raise ValueError(f"teacher must be a path, got {self.teacher!r}")
        AugmentConfig(**self.augment)  # unknown augmentation fields fail here, with the objective's name


@register
class Distill(Objective):
    key = "distill"
    Options = DistillOptions

    def __init__(self, spec: ObjectiveSpec, options: DistillOptions):
        if not options.teacher:
            raise ValueError("distill needs a teacher: --set teacher=PATH, where PATH is an exported ONNX encoder "
                             "directory (python -m export), a RUN/model directory, or a weights file together with "
                             "--set teacher_backbone=NAME")
        super().__init__(spec, options)
        config = self.encoder.config
        # A plain attribute, not a submodule: out of parameters(), state_dict(), train() and RUN/model. Loaded on a
        # forked RNG, so the student's head starts the same whichever kind of teacher (random-init model or not).
        with torch.random.fork_rng(devices=[]):
            self.teacher = load_teacher(options.teacher, options.teacher_backbone, options.teacher_image_size,
                                        channels=config.channels, student_image_size=config.image_size)
        self.projection = nn.Linear(self.encoder.embed_dim, self.teacher.dim)
        nn.init.trunc_normal_(self.projection.weight, std=0.02)
        size = auto_queue_size(spec.num_train_samples) if options.queue_size == "auto" else int(options.queue_size)
        self.register_buffer("teacher_queue", torch.zeros(size, self.teacher.dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # Constants of the student's normalisation (moved with the objective, not saved).
        self.register_buffer("student_mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    def views(self) -> OneView:
        """One augmented view ``image``, normalised for the student; the teacher gets the same pixels."""
        config = self.encoder.config
        return OneView(config.image_size, config.mean, config.std, AugmentConfig(**self.options.augment))

    @torch.no_grad()
    def enqueue(self, targets: torch.Tensor) -> None:
        """FIFO: write ``targets`` [N, D] over the oldest rows (wrapping around); a batch larger than the queue keeps
        its first rows, as LightlyTrain does."""
        size = self.teacher_queue.shape[0]
        targets = targets[:size]
        index = (self.queue_ptr + torch.arange(targets.shape[0], device=targets.device)) % size
        self.teacher_queue[index] = targets.to(self.teacher_queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + targets.shape[0]) % size)
        self.queue_filled.clamp_(max=size - targets.shape[0]).add_(targets.shape[0])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"]
        if self.options.mixup and self.training:
            images = mixup(images)
        pixels = images.float() * self.student_std + self.student_mean  # the view in [0, 1], as the teacher sees it
        targets = F.normalize(self.teacher(pixels), dim=1)
        student = F.normalize(self.projection(self.encoder.encode_image(images)).float(), dim=1)
        targets = gather_no_grad(targets)
        student = gather_with_grad(student)
        self.enqueue(targets)  # before the loss, as LightlyTrain: the batch's own targets are among the classes
        queue = self.teacher_queue[: int(self.queue_filled)].clone()  # a copy: the next step's enqueue writes in place
        loss = queue_distillation_loss(student, targets, queue, self.options.temperature)
        with torch.no_grad():
            cosine = (student * targets).sum(dim=1).mean()  # how close the student's projection is to its target
        return {"loss": loss, "teacher_cosine": cosine, "embedding_std": embedding_std(student)}

    def model_card_extras(self) -> dict:
        return {"distilled_from": self.teacher.card()}


def mixup(images: torch.Tensor) -> torch.Tensor:
    """LightlyTrain's mixup: lambda ~ U(0, 1), one per batch, and ``lambda x + (1 - lambda) x[perm]``."""
    lam = float(torch.empty(()).uniform_(0.0, 1.0))
    index = torch.randperm(images.shape[0], device=images.device)
    return lam * images + (1.0 - lam) * images[index]
