"""The lightly side of the benchmark: SimCLR, MoCo v2, BYOL, SimSiam, SwAV, DINO, Barlow Twins, VICReg, NNCLR, TiCo,
DCL/DCLW and MSN trained with lightly (1.6), as a lightly user would.

Written after lightly's own examples (``examples/pytorch/<method>.py``): lightly's projection/prediction heads,
prototypes and losses (``NTXentLoss`` with ``memory_bank_size=(K, D)`` as MoCo's queue,
``NegativeCosineSimilarity``, ``SwaVLoss``, ``DINOLoss``, ``BarlowTwinsLoss``), ``update_momentum`` with
``cosine_schedule`` and ``deactivate_requires_grad`` for momentum networks, lightly's transforms for the views
(``SimCLRTransform``, ``MoCoV2Transform``, ``SimSiamTransform``, ``BYOLTransform``, ``SwaVTransform``,
``DINOTransform``), and a plain ``DataLoader`` over a ``webdataset.WebDataset`` of the shards. Everything that is not the
library under test is shared with manyview so that only the libraries differ:

* the backbone is ``trainer.models.build_backbone("resnet18-cifar")`` (the same network, same seed);
* the hyper-parameters and augmentation values are read from manyview's recipe
  (``trainer/recipes/<method>.yaml``), the LR follows ``trainer.optim.lr_at`` (warm-up + cosine over the
  nominal ``--max-steps``, linear scaling by batch / 256), the recipe's optimizer (SGD or LARS, built by
  ``trainer.optim.build_optimizer``), no weight decay on biases and norms (lightly's
  ``get_weight_decay_parameters``, as in lightly's own benchmarks); schedules counted in epochs by lightly
  (DINO's teacher-temperature warm-up and last-layer freezing) are given in steps;
* the stopping rule is manyview's ``--time-budget``: the clock starts when the loop starts iterating the
  loader (worker start-up included) and training stops after the first step that ends past the budget;
* one ``metrics.jsonl`` record per step (step, loss, lr, images_seen, time), like manyview with
  ``--log-every 1``, so the driver measures throughput from both sides with the same code;
* the trained backbone is written as a manyview model directory (``RUN/model``) so kNN runs through the
  same ``trainer.evaluate`` code as manyview's own runs.

Run in its own process with lightly on the path (``PYTHONPATH=.bench-site``), so the manyview side never
imports lightly::

    PYTHONPATH=.bench-site python tests/benchmarks/lightly_side.py --method simclr \
        --train-data 'DATA/train-{000000..000009}.tar.gz' --output RUN --max-steps 100 --time-budget 600
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

import torch
import webdataset as wds
from lightly.loss import (BarlowTwinsLoss, DCLLoss, DCLWLoss, DINOLoss, MSNLoss, NegativeCosineSimilarity, NTXentLoss,
                          SwaVLoss, TiCoLoss, VICRegLoss)
from lightly.models.modules import (BarlowTwinsProjectionHead, BYOLPredictionHead, BYOLProjectionHead,
                                    DINOProjectionHead, MaskedVisionTransformerTIMM, MoCoProjectionHead,
                                    NNCLRPredictionHead, NNCLRProjectionHead, NNMemoryBankModule, SimCLRProjectionHead,
                                    SimSiamPredictionHead, SimSiamProjectionHead, SwaVProjectionHead, SwaVPrototypes)
from lightly.models.modules.heads import MSNProjectionHead, TiCoProjectionHead, VICRegProjectionHead
from lightly.models.utils import (deactivate_requires_grad, get_weight_decay_parameters, random_token_mask,
                                  update_momentum)
from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform,
                                MoCoV2Transform, MSNTransform, SimCLRTransform, SimSiamTransform, SwaVTransform)
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from trainer.config import TrainConfig, load_recipe, recipe_path
from trainer.data.shards import count_samples, expand_patterns
from trainer.models import EmbeddingModel, ModelConfig, build_backbone, save_model
from trainer.optim import build_optimizer, lr_at, scaled_lr
from trainer.loop import peak_memory_mb

METHODS = ("simclr", "moco2", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "nnclr", "tico", "dcl",
           "dclw", "msn")


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


def recipe(method: str) -> TrainConfig:
    """manyview's recipe for ``method``: the single source of every hyper-parameter on both sides."""
    return load_recipe(recipe_path(method), TrainConfig(objective=method))


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
    raise ValueError(f"no lightly transform for {method!r}")


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


def loader_for(urls: list[str], transform, batch_size: int, num_workers: int, shuffle_buffer: int, seed: int):
    """An endless stream of ([view0, view1], label) batches: WebDataset (shards drawn with replacement) + DataLoader."""
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed)
        .shuffle(shuffle_buffer)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def train(args: argparse.Namespace) -> dict:
    config = recipe(args.method)
    options = config.objective_options
    torch.manual_seed(args.seed)
    image_size = args.image_size or config.data.image_size
    built = build_backbone(args.backbone, image_size)
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
    loader = loader_for(urls, transform, args.batch_size, args.num_workers,
                        config.data.shuffle_buffer, args.seed)

    os.makedirs(args.output, exist_ok=True)
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    open(metrics_path, "w").close()
    model.train()
    step, images_seen = 0, 0
    started = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") as metrics:
        for views, _ in loader:
            views = [v.to(device, non_blocking=True) for v in views]
            lr = lr_at(step, base_lr, config.optim.warmup_steps, args.max_steps, config.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
                loss = step_loss(views, step)
            loss.backward()
            if hasattr(model, "after_backward"):
                model.after_backward(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images_seen += args.batch_size
            record = {"step": step, "loss": loss.item(), "lr": lr, "images_seen": images_seen, "time": time.time(),
                      "peak_memory_mb": peak_memory_mb(device)}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if not torch.isfinite(torch.tensor(record["loss"])):
                raise RuntimeError(f"lightly {args.method}: loss is {record['loss']} at step {step}")
            if step >= args.max_steps or time.perf_counter() - started >= args.time_budget:
                break

    encoder = EmbeddingModel(ModelConfig(backbone=args.backbone, image_size=image_size))
    encoder.backbone.load_state_dict({k: v.cpu() for k, v in model.backbone.state_dict().items()})
    save_model(encoder, os.path.join(args.output, "model"),
               {"objective": f"lightly-{args.method}", "backbone": args.backbone, "steps": step,
                "train_data": args.train_data})
    return {"steps": step, "images_seen": images_seen, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightly_side", description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-steps", type=int, required=True, help="nominal length of the LR schedule")
    parser.add_argument("--time-budget", type=float, required=True, help="seconds of training")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="resnet18-cifar")
    parser.add_argument("--image-size", type=int, help="default: the recipe's")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = parser.parse_args(argv)
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
