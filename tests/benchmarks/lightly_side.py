"""The lightly side of the benchmark: SimCLR, MoCo v2, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg, NNCLR, TiCo,
DCL/DCLW, MSN, MAE, I-JEPA and iBOT trained with lightly (1.6), as a lightly user would.

Written after lightly's own examples (``examples/pytorch/<method>.py``): lightly's projection/prediction heads,
prototypes and losses (``NTXentLoss`` with ``memory_bank_size=(K, D)`` as MoCo's queue,
``NegativeCosineSimilarity``, ``SwaVLoss``, ``DINOLoss``, ``BarlowTwinsLoss``, ``IBOTPatchLoss``), ``update_momentum``
with ``cosine_schedule`` and ``deactivate_requires_grad`` for momentum networks, lightly's transforms for the views
(``SimCLRTransform``, ``MoCoV2Transform``, ``SimSiamTransform``, ``BYOLTransform``, ``SwaVTransform``,
``DINOTransform``, ``MAETransform``, ``IJEPATransform``, ``IBOTTransform``), and a plain ``DataLoader`` over a
``webdataset.WebDataset`` of the shards. Everything that is not the library under test is shared with manyview so
that only the libraries differ:

* the backbone is ``trainer.models.build_backbone(--backbone)`` (the same network, same seed), with the ViT pooling
  manyview's objective exports (``VIT_POOL``: the mean of the patch tokens for ijepa);
* the hyper-parameters and augmentation values are read from manyview's recipe
  (``trainer/recipes/<method>.yaml``) with manyview's own flags given after the lightly side's (``RECIPE_FLAGS``:
  ``--optimizer``, ``--lr``, ``--weight-decay``, ``--warmup-steps``, ``--grad-clip``, ``--set KEY=VALUE``, ...)
  applied by manyview's ``config_from_args``, exactly as ``trainer/pretrain.py`` applies them; the LR follows
  ``trainer.optim.lr_at`` (warm-up + cosine over the nominal ``--max-steps``, linear scaling by batch / 256), the
  recipe's optimizer (SGD, LARS or AdamW with its betas, built by ``trainer.optim.build_optimizer``), no weight decay
  on biases and norms (lightly's ``get_weight_decay_parameters``, as in lightly's own benchmarks), the recipe's
  global-norm gradient clipping (lightly's DINO benchmarks clip at 3.0 the same way); schedules counted in epochs
  by lightly (DINO's teacher-temperature warm-up and last-layer freezing) are given in steps;
* ``--image-size`` and ``--mixed-precision`` are manyview's: the views are made at that size by lightly's
  transforms (and ijepa's mask collator), the ViT is built for it, and the loss is computed under autocast on the
  training device with that dtype, the backward outside it, fp16 with a ``GradScaler`` (unscaled before the
  clip) and bf16 without, as manyview's loop (Accelerate) does;
* the stopping rule is manyview's ``--time-budget``: the clock starts when the loop starts iterating the
  loader (worker start-up included) and training stops after the first step that ends past the budget;
* one ``metrics.jsonl`` record per step (step, loss, lr, images_seen, time), like manyview with
  ``--log-every 1``, so the driver measures throughput from both sides with the same code;
* the trained backbone is written as a manyview model directory (``RUN/model``) so kNN runs through the
  same ``trainer.evaluate`` code as manyview's own runs; for the ViT methods it is the encoder a user keeps and
  manyview exports: MSN's anchor, MAE's encoder, I-JEPA's context encoder, iBOT's student.

The ViT methods (mae, ijepa, ibot) wrap the timm ViT manyview builds in ``MaskedVisionTransformerTIMM``, with the
recipe's mask ratios, decoder/predictor/head sizes, temperatures, EMA schedules and crops. What differs, each
lightly's own way where lightly has no equivalent of manyview's option:

* all three: lightly's transforms crop with bicubic interpolation (manyview bilinear); masks are drawn on the
  training device in the step (manyview: in the data workers); EMA updates come before the step's forward as in
  lightly's examples (the same momenta as manyview's update after the previous step).
* mae: the encoder starts from lightly's MAE init (``weight_initialization=""``: xavier, fixed 2-D sin-cos
  positions), which is what manyview's ``encoder_init: mae`` / ``position_embedding: sincos`` do, but the random
  draws differ; the decoder (``MaskedVisionTransformerDecoderTIMM``, the replacement lightly 1.6 gives for the
  deprecated ``MAEDecoderTIMM``) predicts the masked patches only (manyview predicts all and scores the masked).
* ijepa: ``IJEPAMaskCollator`` (lightly's and the authors' collate) draws one target-block size and one context
  size per batch and trims every context to the batch's smallest: about 8-13 of 64 patches at batch 256, where
  manyview keeps a fixed ``context_ratio`` (16 of 64 at 0.25) and fixed 12-patch target blocks; its context block
  is always the top-left 7 x 7 (manyview: any position); ``min_keep`` is lightly's 4. ``IJEPATransform``'s fixed
  horizontal flip is switched off (manyview's ijepa and the paper do not flip). ``IJEPAPredictorTIMM`` keeps
  lightly's init (zero mask token, timm's default block init; manyview: truncated normal 0.02 with depth scaling).
* ibot: ``random_block_mask`` masks exactly ``mask_probability`` of the global crops, each at a ratio from its own
  slice of ``mask_ratio`` (DINOv2's masking), where manyview masks each crop with that probability at a uniform
  ratio; ``IBOTPatchLoss`` centres the patch outputs with the teacher's mean at the masked patches only (DINOv2's),
  manyview with the mean over every patch (the iBOT authors' ``center2``), so lightly's teacher head runs on the
  masked patches only; lightly's mask token (1 x 1 x D) takes weight decay, manyview's does not. Not used on either
  side (the example has them): drop path, LayerScale, the weight-decay schedule.

Run in its own process with lightly on the path (``PYTHONPATH=.bench-site``), so the manyview side never
imports lightly::

    PYTHONPATH=.bench-site python tests/benchmarks/lightly_side.py --method simclr \
        --train-data 'DATA/train-{000000..000009}.tar.gz' --output RUN --max-steps 100 --time-budget 600
    PYTHONPATH=.bench-site python tests/benchmarks/lightly_side.py --method mae --backbone vit-micro-cifar \
        --train-data 'DATA/train-{000000..000009}.tar.gz' --output RUN --max-steps 100 --time-budget 600 \
        --optimizer adamw --lr 4e-3 --set decoder_width=64
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

import torch
import webdataset as wds
from lightly.data import IJEPAMaskCollator
from lightly.loss import (BarlowTwinsLoss, DCLLoss, DCLWLoss, DINOLoss, IBOTPatchLoss, MSNLoss,
                          NegativeCosineSimilarity, NTXentLoss, SwaVLoss, TiCoLoss, VICRegLoss)
from lightly.models.modules import (BarlowTwinsProjectionHead, BYOLPredictionHead, BYOLProjectionHead,
                                    DINOProjectionHead, IJEPAPredictorTIMM, MaskedVisionTransformerDecoderTIMM,
                                    MaskedVisionTransformerTIMM, MoCoProjectionHead, NNCLRPredictionHead,
                                    NNCLRProjectionHead, NNMemoryBankModule, SimCLRProjectionHead,
                                    SimSiamPredictionHead, SimSiamProjectionHead, SwaVProjectionHead, SwaVPrototypes)
from lightly.models.modules.heads import MSNProjectionHead, TiCoProjectionHead, VICRegProjectionHead
from lightly.models.modules.masked_vision_transformer_timm import init_weights
from lightly.models.utils import (apply_masks, deactivate_requires_grad, get_at_index, get_weight_decay_parameters,
                                  normalize_mean_var, patchify, random_block_mask, random_token_mask,
                                  repeat_interleave_batch, set_at_index, update_momentum)
from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform, IBOTTransform,
                                MAETransform, MoCoV2Transform, MSNTransform, SimCLRTransform, SimSiamTransform,
                                SwaVTransform)
from lightly.transforms.ijepa_transform import IJEPATransform
from lightly.utils.scheduler import cosine_schedule, linear_warmup_schedule
from torch import nn
from torch.nn import functional as F

from trainer.config import TrainConfig, add_arguments, config_from_args
from trainer.data.shards import count_samples, expand_patterns
from trainer.models import EmbeddingModel, ModelConfig, build_backbone, save_model
from trainer.optim import build_optimizer, lr_at, scaled_lr
from trainer.loop import peak_memory_mb

METHODS = ("simclr", "moco2", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "nnclr", "tico", "dcl",
           "dclw", "msn", "mae", "ijepa", "ibot")
# manyview's own flags that the lightly side also takes, after its own: they are applied to the recipe by manyview's
# ``config_from_args`` (the code ``trainer/pretrain.py`` runs), so both sides read the same hyper-parameters.
RECIPE_FLAGS = ("--optimizer", "--lr", "--weight-decay", "--warmup-steps", "--grad-clip", "--set", "--vit-pool",
                "--register-tokens")
# The exported ViT feature where manyview's objective sets one (``model_config`` in trainer/objectives/<method>.py):
# I-JEPA evaluates the mean of the patch tokens, MAE the class token; the others keep the backbone's (class token).
VIT_POOL = {"mae": "token", "ijepa": "avg"}


class Projected(nn.Module):
    """lightly's examples' shape: backbone -> projection head (-> prediction head), features flattened."""

    def __init__(self, backbone: nn.Module, projection_head: nn.Module, prediction_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head
        self.prediction_head = prediction_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class WithMomentum(nn.Module):
    """An online ``Projected`` network plus a momentum copy of backbone + projection head (MoCo, BYOL, DINO)."""

    def __init__(self, online: Projected, teacher_head: nn.Module | None = None):
        super().__init__()
        self.online = online
        self.backbone_momentum = copy.deepcopy(online.backbone)
        self.projection_head_momentum = teacher_head if teacher_head is not None else copy.deepcopy(online.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    @property
    def backbone(self) -> nn.Module:
        return self.online.backbone

    def update(self, momentum: float) -> None:
        update_momentum(self.online.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.online.projection_head, self.projection_head_momentum, m=momentum)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def recipe(method: str, overrides: list[str] | None = None) -> TrainConfig:
    """manyview's recipe for ``method`` with manyview's flags ``overrides`` (``RECIPE_FLAGS``: ``--lr 4e-3``,
    ``--set decoder_width=64``, ...) applied by manyview's own ``config_from_args``: the single source of every
    hyper-parameter on both sides."""
    parser = argparse.ArgumentParser(prog="manyview recipe flags")
    add_arguments(parser)
    flags = parser.parse_args(["--objective", method, "--train-data", "unused", "--max-steps", "1", *(overrides or [])])
    return config_from_args(flags)


def _jitter(augment: dict) -> dict:
    """manyview's jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s) with strength s is lightly's ``cj_strength=s`` with
    SimCLR's (0.8, 0.8, 0.8, 0.2) factors."""
    return {"cj_prob": augment.get("jitter_prob", 0.8), "cj_strength": augment.get("jitter_strength", 0.5),
            "cj_bright": 0.8, "cj_contrast": 0.8, "cj_sat": 0.8, "cj_hue": 0.2,
            "random_gray_scale": augment.get("grayscale_prob", 0.2), "hf_prob": augment.get("flip", 0.5)}


def _min_scale(augment: dict) -> float:
    crop = augment.get("crop_scale", (0.2, 1.0))
    if float(crop[1]) != 1.0:
        raise ValueError(f"lightly's transforms crop up to scale 1.0; the recipe asks for {crop}")
    return float(crop[0])


def transform_for(method: str, options: dict, image_size: int, mean, std):
    """lightly's transform for ``method`` configured to the recipe's augmentation (manyview's
    ``AugmentConfig`` fields; blur is off in the CIFAR recipes)."""
    augment = options.get("augment", {})
    normalize = {"mean": list(mean), "std": list(std)}
    common = {**_jitter(augment), "gaussian_blur": augment.get("blur_prob", 0.0), "normalize": normalize}
    if method in ("simclr", "moco2", "simsiam", "dcl", "dclw"):
        transform_cls = {"simclr": SimCLRTransform, "moco2": MoCoV2Transform, "simsiam": SimSiamTransform,
                         "dcl": SimCLRTransform, "dclw": SimCLRTransform}[method]
        return transform_cls(input_size=image_size, min_scale=_min_scale(augment), **common)
    # lightly's Barlow Twins example uses BYOL's transforms too; VICReg, NNCLR and TiCo take the recipe's asymmetric
    # views (view1 solarize 0.2) as BYOL's view 1 / view 2 transforms configured to the recipe's values.
    if method in ("byol", "barlow_twins", "vicreg", "nnclr", "tico"):
        second = {**augment, **options.get("second_view_augment", {})}
        view1 = BYOLView1Transform(input_size=image_size, min_scale=_min_scale(augment),
                                   solarization_prob=augment.get("solarize_prob", 0.0), **common)
        view2 = BYOLView2Transform(input_size=image_size, min_scale=_min_scale(second),
                                   **{**_jitter(second), "gaussian_blur": second.get("blur_prob", 0.0),
                                      "solarization_prob": second.get("solarize_prob", 0.0), "normalize": normalize})
        return BYOLTransform(view_1_transform=view1, view_2_transform=view2)
    if method == "msn":  # the recipe's 1 target + num_random_views anchors + num_focal_views focal crops
        return MSNTransform(random_size=image_size, focal_size=int(options.get("focal_crop_size", 16)),
                            random_views=1 + int(options.get("num_random_views", 1)),
                            focal_views=int(options.get("num_focal_views", 10)),
                            random_crop_scale=tuple(options.get("crop_scale", (0.3, 1.0))),
                            focal_crop_scale=tuple(options.get("focal_crop_scale", (0.05, 0.3))),
                            **common)
    if method == "mae":  # one view: random resized crop + flip (MAETransform has no colour jitter, as the recipe)
        for name, wanted in (("flip", 0.5), ("jitter_prob", 0.0), ("grayscale_prob", 0.0), ("blur_prob", 0.0),
                             ("solarize_prob", 0.0)):
            if float(augment.get(name, wanted)) != wanted:
                raise ValueError(f"lightly's MAETransform has {name}={wanted}; the recipe asks for {augment[name]}")
        return MAETransform(input_size=image_size, min_scale=_min_scale(augment), normalize=normalize)
    if method == "ijepa":  # one random resized crop, nothing else
        crop = tuple(options.get("crop_scale", (0.3, 1.0)))
        transform = IJEPATransform(input_size=image_size, min_scale=_min_scale({"crop_scale": crop}),
                                   normalize=normalize)
        # IJEPATransform always flips horizontally (p 0.5); the paper, the authors' configs and manyview's ijepa do
        # not flip, so the flip is switched off here to give both sides the same views (its crop stays bicubic).
        for step in transform.transform.transforms:
            if type(step).__name__ == "RandomHorizontalFlip":
                step.p = 0.0
        return transform
    global_scale = tuple(options.get("global_crop_scale", (0.14, 1.0)))
    local_scale = tuple(options.get("local_crop_scale", (0.05, 0.14)))
    local_size, local_count = int(options.get("local_crop_size", 16)), int(options.get("num_local_crops", 6))
    if method == "swav":
        return SwaVTransform(crop_sizes=(image_size, local_size), crop_counts=(2, local_count),
                             crop_min_scales=(global_scale[0], local_scale[0]),
                             crop_max_scales=(global_scale[1], local_scale[1]), **common)
    if method == "dino":
        jitter = _jitter(augment)
        return DINOTransform(global_crop_size=image_size, global_crop_scale=global_scale, local_crop_size=local_size,
                             local_crop_scale=local_scale, n_local_views=local_count,
                             gaussian_blur=(augment.get("blur_prob", 0.0),) * 3,
                             solarization_prob=augment.get("solarize_prob", 0.0), normalize=normalize,
                             **{k: jitter[k] for k in ("cj_prob", "cj_strength", "cj_bright", "cj_contrast", "cj_sat",
                                                        "cj_hue", "random_gray_scale", "hf_prob")})
    if method == "ibot":  # DINO's multi-crop views, lightly's IBOTTransform configured as the dino mapping above
        jitter = _jitter(augment)
        return IBOTTransform(global_crop_size=image_size, global_crop_scale=global_scale, local_crop_size=local_size,
                             local_crop_scale=local_scale, n_local_views=local_count,
                             gaussian_blur=(augment.get("blur_prob", 0.0),) * 3,
                             solarization_prob=augment.get("solarize_prob", 0.0), normalize=normalize,
                             **{k: jitter[k] for k in ("cj_prob", "cj_strength", "cj_bright", "cj_contrast", "cj_sat",
                                                        "cj_hue", "random_gray_scale", "hf_prob")})
    raise ValueError(f"no lightly transform for {method!r}")


def collate_for(method: str, options: dict, image_size: int, backbone: nn.Module):
    """The DataLoader's ``collate_fn``: lightly's ``IJEPAMaskCollator`` for ijepa (the example's), else None.

    The collator is configured with the recipe's mask settings: ``context_scale`` -> ``enc_mask_scale``,
    ``target_scale`` -> ``pred_mask_scale``, ``target_aspect_ratio`` -> ``aspect_ratio``, ``num_targets`` ->
    ``npred``, one context block (``nenc=1``). It has no ``context_ratio``: it draws one block size per batch and
    trims every context (and target) of the batch to the batch's smallest, which is what the authors' code does
    and what manyview's fixed ``context_ratio`` stands in for (manyview keeps exactly int(L * context_ratio)
    patches of each context, 16 of 64 at 0.25; lightly's per-batch minimum is logged as ``context_patches``)."""
    if method != "ijepa":
        return None
    return IJEPAMaskCollator(input_size=image_size, patch_size=int(backbone.patch_embed.patch_size[0]),
                             enc_mask_scale=tuple(options.get("context_scale", (0.85, 1.0))),
                             pred_mask_scale=tuple(options.get("target_scale", (0.15, 0.2))),
                             aspect_ratio=tuple(options.get("target_aspect_ratio", (0.75, 1.5))),
                             nenc=1, npred=int(options.get("num_targets", 4)))


def batch_views(method: str, batch):
    """What ``step_loss`` takes from one loader batch: the list of views, or for ijepa (the collator's
    ``(images, labels), masks_enc, masks_pred``) ``[images, masks_enc, masks_pred]``."""
    if method == "ijepa":
        (images, _), masks_enc, masks_pred = batch
        return [images, masks_enc, masks_pred]
    return batch[0]


def _to_device(value, device: torch.device):
    if isinstance(value, (list, tuple)):
        return [_to_device(v, device) for v in value]
    return value.to(device, non_blocking=True)


def build_method(method: str, options: dict, backbone: nn.Module, feature_dim: int, max_steps: int,
                 steps_per_epoch: int = 1):
    """(model, step_loss) as in lightly's example for ``method``; ``step_loss(views, step)`` returns the loss
    (momentum updates included, before the forward as the examples do) and the model exposes ``.backbone``.
    Durations manyview's recipes give in epochs become steps (``steps_per_epoch``), and lightly is given
    steps where it counts epochs, so both sides freeze and warm up for the same number of steps."""
    def opt(name, default):
        return options.get(name, default)

    def steps(name: str, default_epochs: float) -> int:
        given = options.get(f"{name}_steps")
        return int(given) if given is not None else round(float(opt(f"{name}_epochs", default_epochs)) * steps_per_epoch)

    hidden, out_dim = int(opt("projection_hidden_dim", 2048)), int(opt("projection_dim", opt("embed_dim", 128)))
    if method == "simclr":
        model = Projected(backbone, SimCLRProjectionHead(feature_dim, hidden, out_dim))
        criterion = NTXentLoss(temperature=float(opt("temperature", 0.5)))
        return model, lambda views, step: criterion(model(views[0]), model(views[1]))
    if method == "moco2":
        model = WithMomentum(Projected(backbone, MoCoProjectionHead(feature_dim, hidden, out_dim)))
        criterion = NTXentLoss(temperature=float(opt("temperature", 0.2)),
                               memory_bank_size=(int(opt("queue_size", 4096)), out_dim))

        def moco_loss(views, step):
            model.update(float(opt("momentum", 0.99)))
            return criterion(model.online(views[0]), model.forward_momentum(views[1]))
        return model, moco_loss
    if method == "byol":
        online = Projected(backbone, BYOLProjectionHead(feature_dim, hidden, out_dim),
                           BYOLPredictionHead(out_dim, int(opt("predictor_hidden_dim", 4096)), out_dim))
        model, criterion = WithMomentum(online), NegativeCosineSimilarity()

        def byol_loss(views, step):
            model.update(cosine_schedule(step, max_steps, float(opt("momentum", 0.996)), float(opt("final_momentum", 1.0))))
            p0, p1 = (online.prediction_head(online(v)) for v in views[:2])
            z0, z1 = (model.forward_momentum(v) for v in views[:2])
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        return model, byol_loss
    if method == "simsiam":
        model = Projected(backbone, SimSiamProjectionHead(feature_dim, hidden, out_dim),
                          SimSiamPredictionHead(out_dim, int(opt("predictor_hidden_dim", 512)), out_dim))
        criterion = NegativeCosineSimilarity()

        def simsiam_loss(views, step):
            z0, z1 = model(views[0]), model(views[1])
            p0, p1 = model.prediction_head(z0), model.prediction_head(z1)
            return 0.5 * (criterion(z0.detach(), p1) + criterion(z1.detach(), p0))
        return model, simsiam_loss
    if method == "barlow_twins":
        model = Projected(backbone, BarlowTwinsProjectionHead(feature_dim, hidden, out_dim))
        criterion = BarlowTwinsLoss(lambda_param=float(opt("lambd", 5e-3)))
        return model, lambda views, step: criterion(model(views[0]), model(views[1]))
    if method == "swav":
        model = Projected(backbone, SwaVProjectionHead(feature_dim, hidden, out_dim))
        frozen = steps("freeze_prototypes", 1.0)
        model.prototypes = SwaVPrototypes(out_dim, n_prototypes=int(opt("num_prototypes", 300)),
                                          n_steps_frozen_prototypes=frozen)
        criterion = SwaVLoss(temperature=float(opt("temperature", 0.1)),
                             sinkhorn_iterations=int(opt("sinkhorn_iterations", 3)),
                             sinkhorn_epsilon=float(opt("epsilon", 0.05)))

        def swav_loss(views, step):
            model.prototypes.normalize()
            outputs = [model.prototypes(nn.functional.normalize(model(v), dim=1, p=2), step) for v in views]
            return criterion(outputs[:2], outputs[2:])
        return model, swav_loss
    if method == "dino":
        num_outputs, bottleneck = int(opt("out_dim", 4096)), int(opt("bottleneck_dim", 256))
        hidden = int(opt("hidden_dim", 2048))
        freeze = steps("freeze_last_layer", 1.0)
        online = Projected(backbone, DINOProjectionHead(feature_dim, hidden, bottleneck, num_outputs,
                                                        freeze_last_layer=freeze))
        model = WithMomentum(online, DINOProjectionHead(feature_dim, hidden, bottleneck, num_outputs))
        model.projection_head_momentum.load_state_dict(online.projection_head.state_dict())
        warmup = steps("warmup_teacher_temperature", 30.0)
        criterion = DINOLoss(output_dim=num_outputs, warmup_teacher_temp=float(opt("warmup_teacher_temperature", 0.04)),
                             teacher_temp=float(opt("teacher_temperature", 0.07)), warmup_teacher_temp_epochs=warmup,
                             student_temp=float(opt("student_temperature", 0.1)),
                             center_momentum=float(opt("center_momentum", 0.9)))

        def dino_loss(views, step):
            model.update(cosine_schedule(step, max_steps, float(opt("momentum", 0.996)), float(opt("final_momentum", 1.0))))
            teacher = [model.forward_momentum(v) for v in views[:2]]
            student = [online(v) for v in views]
            loss = criterion(teacher, student, epoch=step)  # "epochs" counted in steps: warm-up given in steps
            return loss
        model.after_backward = lambda step: online.projection_head.cancel_last_layer_gradients(current_epoch=step)
        return model, dino_loss
    if method == "vicreg":
        model = Projected(backbone, VICRegProjectionHead(feature_dim, hidden, out_dim,
                                                         num_layers=int(opt("projection_layers", 3))))
        criterion = VICRegLoss(lambda_param=float(opt("invariance_weight", 25.0)),
                               mu_param=float(opt("variance_weight", 25.0)), nu_param=float(opt("covariance_weight", 1.0)))
        return model, lambda views, step: criterion(model(views[0]), model(views[1]))
    if method == "nnclr":  # lightly's examples/pytorch/nnclr.py
        if int(opt("projection_layers", 3)) != 3:
            raise ValueError("lightly's NNCLRProjectionHead has 3 layers")
        model = Projected(backbone, NNCLRProjectionHead(feature_dim, hidden, out_dim),
                          NNCLRPredictionHead(out_dim, int(opt("predictor_hidden_dim", 4096)), out_dim))
        memory_bank = NNMemoryBankModule(size=(int(opt("queue_size", 16384)), out_dim))
        criterion = NTXentLoss(temperature=float(opt("temperature", 0.1)))

        def nnclr_loss(views, step):
            z0, z1 = model(views[0]), model(views[1])
            p0, p1 = model.prediction_head(z0), model.prediction_head(z1)
            z0 = memory_bank(z0.detach(), update=False)
            z1 = memory_bank(z1.detach(), update=True)
            return 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        return model, nnclr_loss
    if method == "tico":  # lightly's examples/pytorch/tico.py: online view 0 against the momentum view 1
        model = WithMomentum(Projected(backbone, TiCoProjectionHead(feature_dim, hidden, out_dim)))
        criterion = TiCoLoss(beta=float(opt("beta", 0.9)), rho=float(opt("rho", 8.0)))

        def tico_loss(views, step):
            model.update(cosine_schedule(step, max_steps, float(opt("momentum", 0.99)), float(opt("final_momentum", 1.0))))
            return criterion(model.online(views[0]), model.forward_momentum(views[1]))
        return model, tico_loss
    if method in ("dcl", "dclw"):  # lightly's examples/pytorch/dcl.py: SimCLR with DCLLoss / DCLWLoss
        model = Projected(backbone, SimCLRProjectionHead(feature_dim, hidden, out_dim))
        temperature = float(opt("temperature", 0.1))
        criterion = (DCLLoss(temperature=temperature) if method == "dcl"
                     else DCLWLoss(temperature=temperature, sigma=float(opt("sigma", 0.5))))
        return model, lambda views, step: criterion(model(views[0]), model(views[1]))
    if method == "msn":  # lightly's examples/pytorch/msn.py, on the timm ViT through MaskedVisionTransformerTIMM
        return _msn(options, backbone, feature_dim, max_steps)
    if method == "mae":  # lightly's examples/pytorch/mae.py
        return _mae(options, backbone)
    if method == "ijepa":  # lightly's examples/pytorch/ijepa.py with lightly's timm modules
        return _ijepa(options, backbone, max_steps)
    if method == "ibot":  # lightly's examples/pytorch/ibot.py
        return _ibot(options, backbone, feature_dim, max_steps, steps("warmup_teacher_temperature", 30.0),
                     steps("freeze_last_layer", 1.0))
    raise ValueError(f"unknown method {method!r}")


def _allow_any_image_size(vit: nn.Module) -> None:
    """Let a timm ViT built for one image size take smaller crops (MSN's focal views), as ``dynamic_img_size=True``
    at construction would: the patch embedding emits NHWC without a size check, and lightly's wrapper then
    interpolates the position embedding."""
    from timm.layers import Format

    vit.dynamic_img_size = True
    vit.patch_embed.strict_img_size = False
    vit.patch_embed.flatten = False
    vit.patch_embed.output_fmt = Format.NHWC


class MSNModel(nn.Module):
    """lightly's MSN example: the anchor (online) ViT + projection head trained, the target an EMA copy of them;
    ``.backbone`` is the anchor ViT, the network manyview's ``msn`` exports too."""

    def __init__(self, vit: nn.Module, feature_dim: int, hidden: int, out_dim: int, num_prototypes: int):
        super().__init__()
        _allow_any_image_size(vit)
        # "skip": keep the seeded timm initialisation, so both sides start from the same network.
        self.anchor_backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip",
                                                           pos_embed_initialization="skip")
        self.anchor_projection_head = MSNProjectionHead(feature_dim, hidden, out_dim)
        self.target_backbone = copy.deepcopy(self.anchor_backbone)
        self.target_projection_head = copy.deepcopy(self.anchor_projection_head)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection_head)
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False).weight

    @property
    def backbone(self) -> nn.Module:
        return self.anchor_backbone.vit

    def update(self, momentum: float) -> None:
        update_momentum(self.anchor_backbone, self.target_backbone, m=momentum)
        update_momentum(self.anchor_projection_head, self.target_projection_head, m=momentum)

    def forward_masked(self, images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        patch = self.anchor_backbone.vit.patch_embed.patch_size[0]
        sequence = (images.shape[-1] // patch) ** 2 + 1  # + the class token, which random_token_mask keeps
        idx_keep, _ = random_token_mask(size=(images.shape[0], sequence), mask_ratio=mask_ratio, device=images.device)
        return self.anchor_projection_head(self.anchor_backbone(images=images, idx_keep=idx_keep))


def _msn(options: dict, backbone: nn.Module, feature_dim: int, max_steps: int):
    def opt(name, default):
        return options.get(name, default)

    model = MSNModel(backbone, feature_dim, int(opt("projection_hidden_dim", 2048)), int(opt("projection_dim", 256)),
                     int(opt("num_prototypes", 1024)))
    criterion = MSNLoss(temperature=float(opt("temperature", 0.1)),
                        sinkhorn_iterations=int(opt("sinkhorn_iterations", 3)),
                        regularization_weight=float(opt("regularisation_weight", 1.0)))
    sharpen = float(opt("target_temperature", 0.025)) / float(opt("temperature", 0.1))  # lightly: T+ / T
    random_views, mask_ratio = int(opt("num_random_views", 1)), float(opt("mask_ratio", 0.15))

    def msn_loss(views, step):
        model.update(cosine_schedule(step, max_steps, float(opt("momentum", 0.996)), float(opt("final_momentum", 1.0))))
        with torch.no_grad():
            targets = model.target_projection_head(model.target_backbone(images=views[0]))
        anchors = model.forward_masked(torch.cat(views[1:1 + random_views]), mask_ratio)
        focal = model.forward_masked(torch.cat(views[1 + random_views:]), mask_ratio)
        # The example passes prototypes.data (they would take no gradient); manyview trains them, as the paper.
        return criterion(torch.cat([anchors, focal]), targets, model.prototypes, target_sharpen_temperature=sharpen)
    return model, msn_loss


class MAEModel(nn.Module):
    """lightly's MAE example: ``MaskedVisionTransformerTIMM`` encodes the visible tokens (class token kept), a linear
    ``decoder_embed``, ``MaskedVisionTransformerDecoderTIMM`` (mask token at the masked positions, fixed 2-D sin-cos
    positions, timm blocks, LayerNorm) and a linear ``prediction_head`` to the pixels of each masked patch.
    ``.backbone`` is the timm ViT, the encoder manyview's ``mae`` exports.

    ``encoder_init`` "mae" / "timm" is lightly's ``weight_initialization`` "" (the MAE authors' xavier init, as
    manyview's ``mae_init_``) / "skip"; ``position_embedding`` "sincos" / "learned" is ``pos_embed_initialization``
    "sincos" (fixed, frozen) / "skip" (timm's learnable one)."""

    def __init__(self, vit: nn.Module, mask_ratio: float, width: int, depth: int, heads: int, encoder_init: str,
                 position_embedding: str):
        super().__init__()
        if vit.num_prefix_tokens != 1:
            raise ValueError("lightly's MAE example keeps exactly one prefix token (the class token) unmasked; "
                             f"this ViT has {vit.num_prefix_tokens}")
        self.mask_ratio = mask_ratio
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.encoder = MaskedVisionTransformerTIMM(
            vit=vit, weight_initialization={"mae": "", "timm": "skip"}[encoder_init],
            pos_embed_initialization={"sincos": "sincos", "learned": "skip"}[position_embedding])
        self.sequence_length = self.encoder.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, width)
        self.decoder = MaskedVisionTransformerDecoderTIMM(num_patches=vit.patch_embed.num_patches, embed_dim=width,
                                                          depth=depth, num_heads=heads,
                                                          num_prefix_tokens=vit.num_prefix_tokens, mlp_ratio=4.0,
                                                          proj_drop_rate=0.0, attn_drop_rate=0.0)
        self.prediction_head = nn.Linear(width, self.patch_size ** 2 * vit.patch_embed.proj.in_channels)
        self.decoder_embed.apply(init_weights)  # outside the decoder: initialised as the example does
        self.prediction_head.apply(init_weights)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.vit

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted pixels, target pixels) of the masked patches."""
        count = images.shape[0]
        idx_keep, idx_mask = random_token_mask(size=(count, self.sequence_length), mask_ratio=self.mask_ratio,
                                               device=images.device)
        encoded = self.encoder.encode(images=images, idx_keep=idx_keep)
        embedded = self.decoder_embed(encoded)
        tokens = set_at_index(embedded.new_zeros(count, self.sequence_length, embedded.shape[-1]), idx_keep, embedded)
        decoded = self.decoder(tokens, idx_mask=idx_mask)  # the decoder puts its mask token at idx_mask
        predictions = self.prediction_head(get_at_index(decoded, idx_mask))
        targets = get_at_index(patchify(images, self.patch_size), idx_mask - 1)  # patches have no class token
        return predictions, targets


def _mae(options: dict, backbone: nn.Module):
    def opt(name, default):
        return options.get(name, default)

    model = MAEModel(backbone, float(opt("mask_ratio", 0.75)), int(opt("decoder_width", 512)),
                     int(opt("decoder_depth", 8)), int(opt("decoder_heads", 16)), str(opt("encoder_init", "mae")),
                     str(opt("position_embedding", "sincos")))
    criterion, norm_pix = nn.MSELoss(), bool(opt("norm_pix_loss", True))

    def mae_loss(views, step):
        predictions, targets = model(views[0])
        if norm_pix:  # the paper's per-patch normalised targets, lightly's normalize_mean_var (unbiased variance)
            targets = normalize_mean_var(targets, dim=-1)
        return criterion(predictions, targets)
    return model, mae_loss


class IJEPAModel(nn.Module):
    """lightly's I-JEPA example on timm: the context encoder is ``MaskedVisionTransformerTIMM`` on the context
    patches (``idx_keep``, class token kept as in manyview), the target encoder its EMA copy on the whole image
    (patch tokens layer-normed, then gathered at the target blocks with ``apply_masks``), the predictor lightly's
    ``IJEPAPredictorTIMM``. ``.backbone`` is the context ViT, the encoder manyview's ``ijepa`` exports.

    lightly's example uses its torchvision ``IJEPABackbone``, whose mask indices address the sequence with the class
    token in front (index 0 is the class token); here the collator's patch indices are shifted past the prefix
    tokens, so context, targets and predictor positions all address the same patches."""

    def __init__(self, vit: nn.Module, predictor_dim: int, depth: int, heads: int):
        super().__init__()
        # "skip": timm's seeded init and learnable position embedding, as manyview's ijepa keeps them.
        self.encoder = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip",
                                                   pos_embed_initialization="skip")
        self.predictor = IJEPAPredictorTIMM(num_patches=vit.patch_embed.num_patches, depth=depth,
                                            mlp_dim=vit.embed_dim, predictor_embed_dim=predictor_dim, num_heads=heads)
        self.target_encoder = copy.deepcopy(self.encoder)
        deactivate_requires_grad(self.target_encoder)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.vit

    def update(self, momentum: float) -> None:
        update_momentum(self.encoder, self.target_encoder, m=momentum)

    def forward_target(self, images, masks_enc, masks_pred) -> torch.Tensor:
        with torch.no_grad():
            h = self.target_encoder.encode(images)[:, self.encoder.vit.num_prefix_tokens:]
            h = F.layer_norm(h, (h.size(-1),))  # normalise over the features
            h = apply_masks(h, masks_pred)
            return repeat_interleave_batch(h, len(images), repeat=len(masks_enc))

    def forward_context(self, images, masks_enc, masks_pred) -> torch.Tensor:
        prefix = self.encoder.vit.num_prefix_tokens
        first = torch.arange(prefix, device=images.device).expand(images.shape[0], -1)
        context = torch.cat([self.encoder.encode(images, idx_keep=torch.cat([first, m + prefix], dim=1))[:, prefix:]
                             for m in masks_enc])
        return self.predictor(context, masks_enc, masks_pred)


def _ijepa(options: dict, backbone: nn.Module, max_steps: int):
    def opt(name, default):
        return options.get(name, default)

    model = IJEPAModel(backbone, int(opt("predictor_dim", 384)), int(opt("predictor_depth", 12)),
                       int(opt("predictor_heads", 12)))
    loss_name = str(opt("loss", "l2"))
    if loss_name not in ("l2", "smooth_l1"):
        raise ValueError(f"ijepa loss {loss_name!r}: l2 or smooth_l1")
    # The paper's L2 (the recipe's default) or the authors' code's smooth L1 (lightly's example).
    criterion = nn.MSELoss() if loss_name == "l2" else nn.SmoothL1Loss()
    start, end = float(opt("momentum", 0.996)), float(opt("final_momentum", 1.0))

    def ijepa_loss(views, step):
        # The example's linear EMA schedule (start -> end over the run), applied before this step's forward: the
        # same momenta as manyview's update after the previous step.
        model.update(start + (end - start) * min(step, max_steps) / max(max_steps, 1))
        images, masks_enc, masks_pred = views
        model.stats = {"context_patches": int(masks_enc[0].shape[1]), "target_patches": int(masks_pred[0].shape[1])}
        return criterion(model.forward_context(images, masks_enc, masks_pred),
                         model.forward_target(images, masks_enc, masks_pred))
    return model, ijepa_loss


class IBOTModel(nn.Module):
    """lightly's iBOT example: student ``MaskedVisionTransformerTIMM`` (block-masked global crops, unmasked local
    crops at their own size) and DINO heads, the teacher an EMA copy of both on the unmasked global crops. One head
    for class and patch tokens when ``shared_head`` (the example's, the recipe's); else a separate patch head (as
    lightly's DINOv2 example). ``.backbone`` is the student ViT, the encoder manyview's ``ibot`` exports."""

    def __init__(self, vit: nn.Module, feature_dim: int, hidden: int, bottleneck: int, out_dim: int,
                 patch_out_dim: int, shared_head: bool, norm_last_layer: bool, freeze_steps: int):
        super().__init__()
        if vit.num_prefix_tokens != 1:
            raise ValueError(f"lightly's iBOT example masks all tokens but the class token; this ViT has "
                             f"{vit.num_prefix_tokens} prefix tokens")
        _allow_any_image_size(vit)  # the local crops run at their own size, the position embedding resampled
        # "skip": timm's seeded init and learnable position embedding, as manyview's ibot (and the example's
        # pos_embed_initialization="skip") keep them.
        self.student_backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip",
                                                            pos_embed_initialization="skip")
        self.teacher_backbone = copy.deepcopy(self.student_backbone)

        def head(outputs: int, **kwargs) -> DINOProjectionHead:
            return DINOProjectionHead(feature_dim, hidden, bottleneck, outputs, **kwargs)

        # The teacher heads start as copies of the student's (manyview's momentum copy; the example builds the
        # teacher head separately), through load_state_dict: the weight-normed last layer does not deep-copy.
        self.student_head = head(out_dim, freeze_last_layer=freeze_steps, norm_last_layer=norm_last_layer)
        self.teacher_head = head(out_dim, norm_last_layer=norm_last_layer)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.shared_head = shared_head
        if shared_head:
            self.student_patch_head, self.teacher_patch_head = self.student_head, self.teacher_head
        else:
            self.student_patch_head = head(patch_out_dim, freeze_last_layer=freeze_steps,
                                           norm_last_layer=norm_last_layer)
            self.teacher_patch_head = head(patch_out_dim, norm_last_layer=norm_last_layer)
            self.teacher_patch_head.load_state_dict(self.student_patch_head.state_dict())
        for module in (self.teacher_backbone, self.teacher_head, self.teacher_patch_head):
            deactivate_requires_grad(module)

    @property
    def backbone(self) -> nn.Module:
        return self.student_backbone.vit

    def update(self, momentum: float) -> None:
        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)
        if not self.shared_head:
            update_momentum(self.student_patch_head, self.teacher_patch_head, m=momentum)

    def after_backward(self, step: int) -> None:  # the last layers take no update in the first steps
        self.student_head.cancel_last_layer_gradients(current_epoch=step)
        if not self.shared_head:
            self.student_patch_head.cancel_last_layer_gradients(current_epoch=step)


def _ibot(options: dict, backbone: nn.Module, feature_dim: int, max_steps: int, warmup_steps: int,
          freeze_steps: int):
    def opt(name, default):
        return options.get(name, default)

    if int(opt("head_layers", 3)) != 3 or bool(opt("use_bn_in_head", False)):
        raise ValueError("lightly's DINOProjectionHead has 3 layers and no batch norm here")
    out_dim, patch_out_dim = int(opt("out_dim", 8192)), int(opt("patch_out_dim", 8192))
    shared = bool(opt("shared_head", True))
    model = IBOTModel(backbone, feature_dim, int(opt("hidden_dim", 2048)), int(opt("bottleneck_dim", 256)), out_dim,
                      patch_out_dim, shared, bool(opt("norm_last_layer", False)), freeze_steps)
    student_temperature = float(opt("student_temperature", 0.1))
    # Submodules of the model, so that their centres move to the device with it.
    model.cls_criterion = DINOLoss(output_dim=out_dim, teacher_temp=float(opt("teacher_temperature", 0.07)),
                                   student_temp=student_temperature, center_momentum=float(opt("center_momentum", 0.9)))
    model.patch_criterion = IBOTPatchLoss(output_dim=out_dim if shared else patch_out_dim,
                                          teacher_temp=float(opt("teacher_patch_temperature", 0.07)),
                                          student_temp=student_temperature,
                                          center_momentum=float(opt("patch_center_momentum", 0.9)))
    vit = model.student_backbone.vit
    patch = int(vit.patch_embed.patch_size[0])
    mask_low, mask_high = (float(v) for v in opt("mask_ratio", (0.1, 0.5)))
    aspect_low, aspect_high = (float(v) for v in opt("mask_aspect_ratio", (0.3, 1 / 0.3)))
    weights = float(opt("dino_loss_weight", 1.0)), float(opt("ibot_loss_weight", 1.0))

    def ibot_loss(views, step):
        model.update(cosine_schedule(step, max_steps, float(opt("momentum", 0.996)), float(opt("final_momentum", 1.0))))
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:]) if len(views) > 2 else None
        count, rows = global_views.shape[0], global_views.shape[-1] // patch
        min_block = opt("min_mask_block", None)
        min_block = int(min_block) if min_block is not None else max(1, rows // 3) ** 2
        max_block = max(min_block, int(float(opt("max_mask_block_ratio", 1.0)) * rows * rows))
        # lightly's block masking (DINOv2's): exactly batch_mask_ratio of the crops masked, each at a ratio from its
        # own slice of (low, high); manyview masks each crop with probability mask_probability at r ~ U(low, high).
        block_mask = random_block_mask(size=(count, rows, rows), batch_mask_ratio=float(opt("mask_probability", 0.5)),
                                       min_image_mask_ratio=mask_low, max_image_mask_ratio=mask_high,
                                       min_num_masks_per_block=min_block, max_num_masks_per_block=max_block,
                                       min_block_aspect_ratio=aspect_low, max_block_aspect_ratio=aspect_high,
                                       device=global_views.device)
        mask = global_views.new_zeros((count, 1 + rows * rows), dtype=torch.bool)
        mask[:, 1:] = block_mask.flatten(start_dim=1)  # never the class token
        with torch.no_grad():
            teacher = model.teacher_backbone.encode(global_views)
            teacher_cls_out = model.teacher_head(teacher[:, 0])
            teacher_masked_out = model.teacher_patch_head(teacher[mask])
        student = model.student_backbone.encode(global_views, mask=mask)
        student_cls_out = [model.student_head(student[:, 0])]
        if local_views is not None:
            student_cls_out.append(model.student_head(model.student_backbone.encode(local_views)[:, 0]))
        student_masked_out = model.student_patch_head(student[mask])
        teacher_temp = linear_warmup_schedule(step, warmup_steps, float(opt("warmup_teacher_temperature", 0.04)),
                                              float(opt("teacher_temperature", 0.07)))
        patch_temp = linear_warmup_schedule(step, warmup_steps, float(opt("warmup_teacher_patch_temperature", 0.04)),
                                            float(opt("teacher_patch_temperature", 0.07)))
        cls_loss = model.cls_criterion(teacher_out=teacher_cls_out.chunk(2),
                                       student_out=torch.cat(student_cls_out).chunk(len(views)),
                                       teacher_temp=teacher_temp)
        patch_loss = model.patch_criterion(teacher_out=teacher_masked_out, student_out=student_masked_out,
                                           mask=block_mask, teacher_temp=patch_temp)
        model.stats = {"masked_fraction": float(block_mask.float().mean())}
        return weights[0] * cls_loss + weights[1] * patch_loss
    return model, ibot_loss


def loader_for(urls: list[str], transform, batch_size: int, num_workers: int, shuffle_buffer: int, seed: int,
               collate_fn=None):
    """An endless stream of ([view0, view1], label) batches: WebDataset (shards drawn with replacement) + DataLoader
    (with ``collate_fn`` the collator's batches, e.g. ijepa's ``((images, labels), masks_enc, masks_pred)``)."""
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed)
        .shuffle(shuffle_buffer)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                       collate_fn=collate_fn)


def train(args: argparse.Namespace) -> dict:
    config = recipe(args.method, getattr(args, "recipe_flags", None))
    options = config.objective_options
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # lightly's block masks (ibot) draw from Python's random
    image_size = args.image_size or config.data.image_size
    vit_pool = config.vit_pool or VIT_POOL.get(args.method)
    built = build_backbone(args.backbone, image_size, register_tokens=config.register_tokens, vit_pool=vit_pool)
    urls = expand_patterns(args.train_data)
    steps_per_epoch = max(1, math.ceil(count_samples(urls) / args.batch_size))
    model, step_loss = build_method(args.method, options, built.module, built.feature_dim, args.max_steps,
                                    steps_per_epoch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)

    base_lr = scaled_lr(config.optim, args.batch_size)
    decay, no_decay = get_weight_decay_parameters([model])  # lightly's split: no decay on biases and norms
    decay, no_decay = [p for p in decay if p.requires_grad], [p for p in no_decay if p.requires_grad]
    # The recipe's optimizer (SGD or LARS, built by the same code as manyview's) so that only the libraries differ.
    optimizer = build_optimizer([{"params": decay, "weight_decay": config.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}], config.optim, base_lr)
    transform = transform_for(args.method, options, image_size, built.mean, built.std)
    loader = loader_for(urls, transform, args.batch_size, args.num_workers, config.data.shuffle_buffer, args.seed,
                        collate_for(args.method, options, image_size, built.module))
    trained = [p for p in model.parameters() if p.requires_grad]
    # Mixed precision as manyview's loop has it (Accelerate's): the forward and the loss under autocast on the
    # training device, the backward outside it; fp16 with a gradient scaler (gradients unscaled before clipping,
    # steps with inf/NaN gradients skipped), bf16 without one.
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

    os.makedirs(args.output, exist_ok=True)
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    open(metrics_path, "w").close()
    model.train()
    step, images_seen = 0, 0
    started = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") as metrics:
        for batch in loader:
            views = _to_device(batch_views(args.method, batch), device)
            lr = lr_at(step, base_lr, config.optim.warmup_steps, args.max_steps, config.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()):
                loss = step_loss(views, step)
            scaler.scale(loss).backward()  # a no-op scale unless fp16
            if config.optim.grad_clip and config.optim.grad_clip > 0:  # the recipe's global-norm clip, as manyview's
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trained, config.optim.grad_clip)
            if hasattr(model, "after_backward"):
                model.after_backward(step)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images_seen += args.batch_size
            record = {"step": step, "loss": loss.item(), "lr": lr, "images_seen": images_seen, "time": time.time(),
                      "peak_memory_mb": peak_memory_mb(device), **getattr(model, "stats", {})}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if not torch.isfinite(torch.tensor(record["loss"])):
                raise RuntimeError(f"lightly {args.method}: loss is {record['loss']} at step {step}")
            if step >= args.max_steps or time.perf_counter() - started >= args.time_budget:
                break

    encoder = EmbeddingModel(ModelConfig(backbone=args.backbone, image_size=image_size,
                                         register_tokens=config.register_tokens, vit_pool=vit_pool))
    encoder.backbone.load_state_dict({k: v.cpu() for k, v in model.backbone.state_dict().items()})
    save_model(encoder, os.path.join(args.output, "model"),
               {"objective": f"lightly-{args.method}", "backbone": args.backbone, "steps": step,
                "train_data": args.train_data, "mixed_precision": args.mixed_precision})
    return {"steps": step, "images_seen": images_seen, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightly_side", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-steps", type=int, required=True, help="nominal length of the LR schedule")
    parser.add_argument("--time-budget", type=float, required=True, help="seconds of training")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="resnet18-cifar")
    parser.add_argument("--image-size", type=int, help="the views' size (lightly's transforms, ijepa's mask collator) "
                        "and the ViT's; default: the recipe's")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                        help="autocast on the training device (fp16 with a gradient scaler), as manyview's loop")
    parser.epilog = ("Also takes manyview's " + ", ".join(RECIPE_FLAGS) + " (e.g. --lr 4e-3 --set decoder_width=64), "
                     "applied to the recipe by manyview's own code, as trainer/pretrain.py does.")
    args, extra = parser.parse_known_args(argv)
    unknown = [flag for flag in (item.split("=", 1)[0] for item in extra if item.startswith("--"))
               if flag not in RECIPE_FLAGS]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} "
                     f"(manyview flags taken here: {', '.join(RECIPE_FLAGS)})")
    args.recipe_flags = extra
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
