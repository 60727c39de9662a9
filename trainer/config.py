"""Typed run configuration: defaults < YAML recipe < command-line flags.

Each component gets its own small dataclass; the objective's own options stay a plain mapping that the
objective validates itself (``objective_options``), so the loop never needs to know them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


@dataclass
class DataConfig:
    train_data: str = ""
    image_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 2000
    samples_per_epoch: int | None = None  # epoch length for --epochs and epoch-based schedules; None: counted
    # Image-text objectives (clip, siglip, lit, coca): the fraction of samples without text (no `txt` member, no
    # json["caption"]) allowed, in [0, 1). Such samples are skipped, never trained on with an empty caption, and
    # counted; a data worker stops the run once more than this fraction of the (at least 1,000) samples it read
    # had none, and the run is refused at the start when none of the first shard's first 64 samples has text.
    # img2dataset writes captions only with --caption_col.
    max_missing_text: float = 0.01
    # Two-view augmentation as batched tensor ops on the training device (workers only decode): on | off | auto
    # (auto: on when the device is a GPU).
    augment_on_device: str = "auto"
    mean: list[float] | None = None  # None: the backbone family's default
    std: list[float] | None = None


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adamw | lars
    lr: float = 0.3  # base lr for a batch of 256; scaled linearly by global batch / 256
    scale_lr: bool = True
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping


@dataclass
class TrainConfig:
    objective: str = "simclr"
    backbone: str = "resnet18-cifar"
    register_tokens: int = 0  # ViT backbones: register tokens (Darcet et al. 2024)
    vit_pool: str | None = None  # ViT backbones: exported feature "token" | "avg"; None: the objective's paper's
    init_from: str | None = None  # RUN/model, a checkpoint, or a local timm / torchvision / open_clip weights file
    init_strict: bool = True  # refuse keys that do not fit (False: load what fits, warn about the rest)
    output: str = "runs/run"
    batch_size: int = 256  # per process
    max_steps: int | None = None
    epochs: float | None = None
    time_budget: float | None = None  # seconds of training after which the run stops (schedule still spans max_steps)
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    # Split each step's batch into micro-batches of this size with cached gradients (objectives with
    # embed()/loss_from_embeddings(): the contrastive loss still sees the whole batch). None: one pass.
    micro_batch_size: int | None = None
    channels_last: bool = False  # NHWC memory format for CNN backbones (faster convolutions under autocast on GPU)
    compile: bool = False  # torch.compile the encoder
    # On the CPU: glibc keeps freed blocks for the next step instead of unmapping them (trainer.host_memory).
    keep_freed_memory: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A recipe or flag that cannot be used; the message says which and why."""


def _merge_section(section: Any, values: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown option {key!r}; known: {sorted(names)}")
        if isinstance(getattr(section, key), tuple) and isinstance(value, list):
            value = tuple(value)
        setattr(section, key, value)


def recipe_path(objective: str) -> str:
    return os.path.join(RECIPES_DIR, f"{objective}.yaml")


def load_recipe(path: str, config: TrainConfig) -> TrainConfig:
    """Apply a YAML recipe: top-level train options, plus ``data:``, ``optim:`` and ``objective:`` sections."""
    if not os.path.exists(path):
        raise ConfigError(f"recipe {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path!r} must be a mapping")
    data = recipe.pop("data", {}) or {}
    optim = recipe.pop("optim", {}) or {}
    options = recipe.pop("objective", {}) or {}
    _merge_section(config.data, data, f"{path} [data]")
    _merge_section(config.optim, optim, f"{path} [optim]")
    config.objective_options.update(options)
    _merge_section(config, recipe, path)
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags; every default is None so that only given flags override the recipe."""
    add = parser.add_argument
    add("--objective", help="registry key (see --list-objectives)")
    add("--list-objectives", action="store_true", help="print the registered objectives and exit")
    add("--config", help="YAML recipe (default: trainer/recipes/<objective>.yaml)")
    add("--train-data", help="shards: brace pattern, glob, directory, or several joined by '::'")
    add("--output", help="run directory (checkpoints/, model/, metrics.jsonl)")
    add("--backbone", help="resnet18-cifar | resnet18/34/50 | timm:<name> | open_clip:<name>")
    add("--register-tokens", type=int, help="ViT backbones: learnable register tokens (Darcet et al. 2024)")
    add("--vit-pool", choices=["token", "avg"], help="ViT backbones: the exported feature, the class token or the "
        "mean of the patch tokens (default: the pooling the objective's paper evaluates with)")
    add("--init-from", help="start from these weights: a manyview RUN/model, a checkpoint RUN/checkpoints/step_N, or a "
        "local timm / torchvision / open_clip weights file for --backbone (nothing is downloaded)")
    add("--init-strict", type=_strict_flag, help="true (default): refuse weights whose keys or shapes do not fit the "
        "model, listing them; false: load what fits and warn about the rest")
    add("--batch-size", type=int, help="per-process batch size")
    add("--max-steps", type=int, help="optimizer steps (0 writes the randomly initialised model)")
    add("--epochs", type=float, help="passes over the training set (alternative to --max-steps)")
    add("--time-budget", type=float, help="stop after this many seconds of training (the LR schedule still spans "
        "--max-steps/--epochs); for equal-wall-clock comparisons")
    add("--lr", type=float, help="base learning rate for a global batch of 256")
    add("--optimizer", choices=["sgd", "adamw", "lars"])
    add("--weight-decay", type=float)
    add("--warmup-steps", type=int)
    add("--grad-clip", type=float, help="max gradient norm; 0 disables")
    add("--mixed-precision", choices=["no", "fp16", "bf16"])
    add("--image-size", type=int)
    add("--num-workers", type=int, help="data loader workers per process")
    add("--augment-on-device", choices=["auto", "on", "off"],
        help="two-view augmentation as batched tensor ops on the training device (auto: on a GPU)")
    add("--samples-per-epoch", type=int, help="epoch length in samples (remote pipe:/URL shards cannot be counted)")
    add("--max-missing-text", type=float, help="image-text objectives: the fraction of samples without a caption "
        "allowed (skipped and counted; above it the run stops), in [0, 1); default 0.01")
    add("--checkpoint-every", type=int, help="save resumable state every N steps")
    add("--log-every", type=int)
    add("--seed", type=int)
    add("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    add("--micro-batch-size", type=int, help="train each step's batch in micro-batches of this size with cached "
        "gradients, keeping every negative of the full batch (the objectives with embed()/loss_from_embeddings(): "
        "simclr, supcon, align_uniform, dcl, dclw, macl, clip, siglip, lit, coca)")
    add("--channels-last", action="store_true", default=None, help="NHWC memory format for CNN backbones")
    add("--compile", action="store_true", default=None, help="torch.compile the encoder")
    add("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
        help="training on the CPU: keep freed host memory for reuse instead of returning it to the OS every step "
        "(default on; up to 1.7x faster CPU steps, up to 20%% more peak memory)")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="objective option override, e.g. --set temperature=0.2 (YAML value syntax)")


def _strict_flag(value: str) -> bool:
    from trainer.init_from import parse_strict

    try:
        return parse_strict(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_FLAG_TARGETS = {
    "objective": ("", "objective"), "backbone": ("", "backbone"), "output": ("", "output"),
    "register_tokens": ("", "register_tokens"), "vit_pool": ("", "vit_pool"),
    "init_from": ("", "init_from"), "init_strict": ("", "init_strict"),
    "batch_size": ("", "batch_size"), "max_steps": ("", "max_steps"), "epochs": ("", "epochs"), "time_budget": ("", "time_budget"),
    "seed": ("", "seed"), "mixed_precision": ("", "mixed_precision"),
    "checkpoint_every": ("", "checkpoint_every"), "log_every": ("", "log_every"),
    "micro_batch_size": ("", "micro_batch_size"), "channels_last": ("", "channels_last"), "compile": ("", "compile"),
    "keep_freed_memory": ("", "keep_freed_memory"),
    "train_data": ("data", "train_data"), "image_size": ("data", "image_size"),
    "num_workers": ("data", "num_workers"), "samples_per_epoch": ("data", "samples_per_epoch"),
    "max_missing_text": ("data", "max_missing_text"),
    "augment_on_device": ("data", "augment_on_device"), "lr": ("optim", "lr"), "optimizer": ("optim", "optimizer"),
    "weight_decay": ("optim", "weight_decay"), "warmup_steps": ("optim", "warmup_steps"),
    "grad_clip": ("optim", "grad_clip"),
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the run config: defaults, then the objective's recipe (or --config), then the flags."""
    if not args.objective:
        raise ConfigError("--objective is required (see --list-objectives)")
    config = TrainConfig(objective=args.objective)
    path = args.config or recipe_path(args.objective)
    if args.config or os.path.exists(path):
        load_recipe(path, config)
    config.objective = args.objective
    for flag, (section, name) in _FLAG_TARGETS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(config, section) if section else config, name, value)
    config.resume = bool(args.resume)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        config.objective_options[key.strip()] = yaml.safe_load(raw)
    if not config.data.train_data:
        raise ConfigError("--train-data is required")
    if config.max_steps is None and config.epochs is None:
        raise ConfigError("give --max-steps or --epochs")
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.data.augment_on_device not in ("auto", "on", "off"):
        raise ConfigError(f"data.augment_on_device must be auto, on or off, got {config.data.augment_on_device!r}")
    if not 0 <= config.data.max_missing_text < 1:
        raise ConfigError(f"data.max_missing_text must be a fraction in [0, 1), got {config.data.max_missing_text}")
    if config.micro_batch_size is not None and not 1 <= config.micro_batch_size <= config.batch_size:
        raise ConfigError(f"--micro-batch-size must be in [1, --batch-size={config.batch_size}], got {config.micro_batch_size}")
    return config
