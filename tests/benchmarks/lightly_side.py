"""The lightly side of the benchmark: SimCLR and MoCo v2 trained with lightly (1.6), as a lightly user would.

Written after lightly's own examples (``examples/pytorch/simclr.py``, ``moco.py``): ``SimCLRProjectionHead`` /
``MoCoProjectionHead``, ``NTXentLoss`` (with ``memory_bank_size=(K, D)`` as MoCo's queue), ``update_momentum``
and ``deactivate_requires_grad`` for the key network, ``SimCLRTransform`` / ``MoCoV2Transform`` for the views,
and a plain ``DataLoader`` over a ``webdataset.WebDataset`` of the shards. Everything that is not the
library under test is shared with manyview so that only the libraries differ:

* the backbone is ``trainer.models.build_backbone("resnet18-cifar")`` (the same network, same seed);
* the hyper-parameters and augmentation values are read from manyview's recipe
  (``trainer/recipes/<method>.yaml``), the LR follows ``trainer.optim.lr_at`` (warm-up + cosine over the
  nominal ``--max-steps``, linear scaling by batch / 256), SGD with momentum, no weight decay on biases and
  norms (lightly's ``get_weight_decay_parameters``, as in lightly's own benchmarks);
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
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

import torch
import webdataset as wds
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
from lightly.transforms import MoCoV2Transform, SimCLRTransform
from torch import nn

from trainer.config import TrainConfig, load_recipe, recipe_path
from trainer.data.shards import expand_patterns
from trainer.models import EmbeddingModel, ModelConfig, build_backbone, save_model
from trainer.optim import lr_at, scaled_lr

METHODS = ("simclr", "moco2")


class SimCLR(nn.Module):
    """lightly's SimCLR example: backbone + SimCLRProjectionHead (Linear-BN-ReLU-Linear)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class MoCo(nn.Module):
    """lightly's MoCo example: query network + a momentum copy for the keys (no gradient)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(feature_dim, hidden_dim, out_dim)  # Linear-ReLU-Linear (v2)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def recipe(method: str) -> TrainConfig:
    """manyview's recipe for ``method``: the single source of every hyper-parameter on both sides."""
    return load_recipe(recipe_path(method), TrainConfig(objective=method))


def transform_for(method: str, augment: dict, image_size: int, mean, std):
    """lightly's transform configured to the recipe's augmentation (manyview's ``AugmentConfig`` fields).

    manyview's jitter is (0.8 s, 0.8 s, 0.8 s, 0.2 s) with strength s, which is lightly's ``cj_strength=s``
    with SimCLR's default (0.8, 0.8, 0.8, 0.2) factors; blur is off in both CIFAR recipes.
    """
    crop = augment.get("crop_scale", (0.2, 1.0))
    if float(crop[1]) != 1.0:
        raise ValueError(f"lightly's transforms crop up to scale 1.0; the recipe asks for {crop}")
    transform_cls = SimCLRTransform if method == "simclr" else MoCoV2Transform
    return transform_cls(
        input_size=image_size,
        cj_prob=augment.get("jitter_prob", 0.8),
        cj_strength=augment.get("jitter_strength", 0.5),
        cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2,
        min_scale=float(crop[0]),
        random_gray_scale=augment.get("grayscale_prob", 0.2),
        gaussian_blur=augment.get("blur_prob", 0.0),
        hf_prob=augment.get("flip", 0.5),
        normalize={"mean": list(mean), "std": list(std)},
    )


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
    built = build_backbone("resnet18-cifar", config.data.image_size)
    backbone = built.module
    hidden = int(options.get("projection_hidden_dim", 2048))
    out_dim = int(options.get("projection_dim", options.get("embed_dim", 128)))  # simclr's / moco2's name
    if args.method == "simclr":
        model = SimCLR(backbone, built.feature_dim, hidden, out_dim)
        criterion = NTXentLoss(temperature=float(options.get("temperature", 0.5)))
    else:
        model = MoCo(backbone, built.feature_dim, hidden, out_dim)
        criterion = NTXentLoss(temperature=float(options.get("temperature", 0.2)),
                               memory_bank_size=(int(options.get("queue_size", 4096)), out_dim))
    key_momentum = float(options.get("momentum", 0.99))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, criterion = model.to(device), criterion.to(device)

    base_lr = scaled_lr(config.optim, args.batch_size)
    decay, no_decay = get_weight_decay_parameters([model.backbone, model.projection_head])
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=base_lr, momentum=config.optim.momentum)
    transform = transform_for(args.method, options.get("augment", {}), config.data.image_size, built.mean, built.std)
    loader = loader_for(expand_patterns(args.train_data), transform, args.batch_size, args.num_workers,
                        config.data.shuffle_buffer, args.seed)

    os.makedirs(args.output, exist_ok=True)
    metrics_path = os.path.join(args.output, "metrics.jsonl")
    open(metrics_path, "w").close()
    model.train()
    step, images_seen = 0, 0
    started = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") as metrics:
        for (x0, x1), _ in loader:
            x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
            lr = lr_at(step, base_lr, config.optim.warmup_steps, args.max_steps, config.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if args.method == "simclr":
                loss = criterion(model(x0), model(x1))
            else:
                update_momentum(model.backbone, model.backbone_momentum, m=key_momentum)
                update_momentum(model.projection_head, model.projection_head_momentum, m=key_momentum)
                loss = criterion(model(x0), model.forward_momentum(x1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images_seen += args.batch_size
            record = {"step": step, "loss": loss.item(), "lr": lr, "images_seen": images_seen, "time": time.time()}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if not torch.isfinite(torch.tensor(record["loss"])):
                raise RuntimeError(f"lightly {args.method}: loss is {record['loss']} at step {step}")
            if step >= args.max_steps or time.perf_counter() - started >= args.time_budget:
                break

    encoder = EmbeddingModel(ModelConfig(backbone="resnet18-cifar", image_size=config.data.image_size))
    encoder.backbone.load_state_dict({k: v.cpu() for k, v in model.backbone.state_dict().items()})
    save_model(encoder, os.path.join(args.output, "model"),
               {"objective": f"lightly-{args.method}", "backbone": "resnet18-cifar", "steps": step,
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
    args = parser.parse_args(argv)
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
