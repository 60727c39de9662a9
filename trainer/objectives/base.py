"""The objective interface the one training loop relies on, and the registry of objectives.

An objective is an ``nn.Module`` that owns an ``EmbeddingModel`` (what gets exported) plus its
training-only parts, builds its own data views, and turns a batch into losses. The loop calls only:
``Objective.build(spec)``, ``views()``, ``forward(batch) -> {"loss": ..., **metrics}``,
``before_optimizer_step(step, total_steps)``, ``after_step(step, total_steps)`` and
``parameter_groups(weight_decay)``; it never names an objective.

Writing one: set ``key`` and ``Options`` (a dataclass; InfoNCE-family objectives mix in
``trainer.objectives.options.InfoNCEOptions``), call ``super().__init__(spec, options)`` first (it sets
``self.spec``, ``self.options`` and builds ``self.encoder`` from ``model_config``), then build the heads
(``trainer.models.heads``) and write ``forward``. The defaults cover the common case: ``model_config`` is the
plain backbone at the run's image size and normalisation, and ``views()`` is the two-view recipe
(``view0``, ``view1``) from ``options.augment`` (and ``options.second_view_augment`` when the options have it);
override only what the paper changes. Class flags the loop reads: ``requires_patch_tokens`` (ViT only),
``requires_text`` (image-text: captions required) and ``dense_sample_ids`` (``batch["id"]`` is a dense slot
0..n-1). Renamed options stay readable through ``Options.ALIASES`` (``parse_options``).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.data.views import ManyViews, TwoViews, view_configs
from trainer.models import EmbeddingModel, ModelConfig
from trainer.models.backbones import is_vit_name
from trainer.models.vit import VIT_BACKBONES


@dataclass
class ObjectiveSpec:
    """What every objective is built from: the shared model settings and its own options mapping."""

    backbone: str = "resnet18-cifar"
    image_size: int = 32
    mean: list[float] | None = None
    std: list[float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    num_train_samples: int | None = None  # size of the training set (memory banks); None when unknown
    total_steps: int | None = None  # optimizer steps of the run (schedules)
    global_batch_size: int | None = None  # images per optimizer step over all processes (epoch-based schedules)
    register_tokens: int = 0  # ViT backbones: register tokens (Darcet et al. 2024)
    vit_pool: str | None = None  # ViT backbones: "token" | "avg" chosen by the user; None: the objective's choice
    # --init-from: weights loaded into the exported model right after it is built, before the objective's heads and
    # momentum copies (trainer.init_from); init_strict refuses any key that does not fit.
    init_from: str | None = None
    init_strict: bool = True

    def steps_per_epoch(self) -> int | None:
        """Optimizer steps in one pass over the training set, or None when either size is unknown."""
        if not self.num_train_samples or not self.global_batch_size:
            return None
        return max(1, -(-self.num_train_samples // self.global_batch_size))


def steps_from_epochs(spec: ObjectiveSpec, steps: int | None, epochs: float, what: str) -> int:
    """A duration given in steps (when set) or in epochs of ``spec``'s training set, as optimizer steps."""
    if steps is not None:
        if steps < 0:
            raise ValueError(f"{what}: steps must be >= 0, got {steps}")
        return int(steps)
    if epochs < 0:
        raise ValueError(f"{what}: epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return 0
    per_epoch = spec.steps_per_epoch()
    if per_epoch is None:
        raise ValueError(f"{what} is given in epochs but the training-set size or batch size is unknown; "
                         f"give it in steps instead")
    return int(round(epochs * per_epoch))


def parse_options(options_type: type, options: dict[str, Any], objective: str):
    """Turn an options mapping into the objective's typed dataclass.

    Unknown keys are an error. Renamed keys listed in ``options_type.ALIASES`` (old name -> new name) still
    work: each warns (``FutureWarning``, naming both) and is read as the new name; giving both is an error.
    A ValueError raised by the options' own validation is prefixed with the objective's key.
    """
    names = {f.name for f in dataclasses.fields(options_type)}
    aliases: dict[str, str] = getattr(options_type, "ALIASES", {})
    options = dict(options)
    for old, new in aliases.items():
        if old not in options:
            continue
        if new in options:
            raise ValueError(f"objective {objective!r}: option {old!r} is the deprecated name of {new!r}; "
                             f"give only {new!r}")
        warnings.warn(f"objective {objective!r}: option {old!r} is deprecated, use {new!r}", FutureWarning,
                      stacklevel=3)
        options[new] = options.pop(old)
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"objective {objective!r}: unknown option(s) {unknown}; known: {sorted(names)}")
    try:
        return options_type(**options)
    except ValueError as error:
        message = str(error)
        if message.startswith((f"{objective}:", f"{objective} ", f"objective {objective!r}")):
            raise
        raise ValueError(f"{objective}: {message}") from None


def default_model_config(spec: ObjectiveSpec, **changes: Any) -> ModelConfig:
    """The exported model of ``spec``: its backbone at the run's image size and normalisation, with the
    ``ModelConfig`` fields an objective's paper changes (a projection, a colour split, a patch grid, the ViT
    pooling its paper evaluates with) set. The user's ``spec.vit_pool`` wins over the objective's ``vit_pool``."""
    changes.setdefault("register_tokens", spec.register_tokens)
    if spec.vit_pool is not None:
        changes["vit_pool"] = spec.vit_pool
    return ModelConfig(backbone=spec.backbone, image_size=spec.image_size, mean=spec.mean, std=spec.std, **changes)


class Objective(nn.Module):
    """Base class: subclasses set ``key`` and ``Options``, call ``super().__init__(spec, options)`` and
    implement ``forward``; they override ``model_config`` and ``views`` only where their paper differs."""

    key: ClassVar[str] = ""
    Options: ClassVar[type] = object
    requires_patch_tokens: ClassVar[bool] = False  # True: needs a ViT backbone (patch tokens, masking; models/vit.py)
    # True: an image-text objective whose views read each sample's caption (clip, siglip, lit, coca). The loop then
    # refuses shards without text and the data workers skip samples without it, counting them, up to the run's
    # data.max_missing_text (trainer.data.pipeline.BuildViews).
    requires_text: ClassVar[bool] = False
    # True: indexes tensors of spec.num_train_samples rows by batch["id"] (memory banks, surrogate classes). The loop
    # then numbers the training samples 0..n-1 by (shard, key) when the run starts (trainer.data.slots), batch["id"]
    # carries that dense slot on any shards, and checkpoints keep the numbering for --resume.
    dense_sample_ids: ClassVar[bool] = False

    @classmethod
    def needs_text(cls, options: dict) -> bool:
        """Whether a run with these (raw) options reads captions: ``requires_text``; composites ask their parts."""
        return cls.requires_text

    @classmethod
    def needs_dense_ids(cls, options: dict) -> bool:
        """Whether a run with these (raw) options needs dense slots in ``batch["id"]``: ``dense_sample_ids``;
        composites ask their parts."""
        return cls.dense_sample_ids

    def __init__(self, spec: ObjectiveSpec, options: Any):
        super().__init__()
        if self.requires_patch_tokens and not is_vit_name(spec.backbone):
            # Before the encoder is built: a ViT-only model config (vit_pool, registers) would fail less clearly.
            raise ValueError(f"{self.key} needs a ViT backbone ({VIT_BACKBONES}), got {spec.backbone}")
        self.spec = spec
        self.options = options
        self.encoder = EmbeddingModel(self.model_config(spec, options))
        self.init_report = None
        if spec.init_from:
            from trainer.init_from import load_initial_weights

            self.init_report = load_initial_weights(self.encoder, spec.init_from, spec.init_strict)

    def model_config(self, spec: ObjectiveSpec, options: Any) -> ModelConfig:
        """The exported model: by default the run's backbone at its image size and normalisation, nothing after
        it. Objectives whose exported model differs (a projection, a colour split, a patch grid) override this
        with ``default_model_config(spec, field=...)``."""
        return default_model_config(spec)

    @classmethod
    def build(cls, spec: ObjectiveSpec) -> "Objective":
        return cls(spec, parse_options(cls.Options, spec.options, cls.key))

    def views(self):
        """The picklable view recipe the data workers apply to each (image, sample).

        Default: two augmented views ``view0`` / ``view1`` at the model's image size, from ``options.augment``
        (``AugmentConfig`` fields) with ``options.second_view_augment`` laid over it for view1 when present."""
        augment = getattr(self.options, "augment", None)
        if augment is None:
            raise NotImplementedError(f"{type(self).__name__}: no views(); its options have no 'augment' for the "
                                      f"default two-view recipe")
        first, second = view_configs(augment, getattr(self.options, "second_view_augment", None))
        config = self.encoder.config
        return TwoViews(config.image_size, config.mean, config.std, first, second)

    def many_views(self, count: int) -> ManyViews:
        """``count`` views ``view0`` ... ``view{count-1}`` from the one recipe ``options.augment`` (MMCR, W-MSE,
        FroSSL, EMP-SSL, FastSiam): what their ``views()`` returns."""
        config = self.encoder.config
        return ManyViews(config.image_size, config.mean, config.std, view_configs(self.options.augment)[0], count)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after backward (gradients averaged over processes), before the optimizer step: the place to
        drop gradients of parameters frozen for a while (SwAV prototypes, DINO's last layer) by setting
        ``param.grad = None``, which also skips their weight decay and momentum."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (momentum encoders, queues, temperature schedules)."""

    def model_card_extras(self) -> dict:
        """JSON-able facts the saved model must carry beside its weights (e.g. jigsaw's permutation set)."""
        return {}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on weights only: biases, norm parameters and scalars (logit scale) are exempt."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        ]


_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: add an objective under its ``key``."""
    if not cls.key:
        raise ValueError(f"{cls.__name__} has no registry key")
    if cls.key in _REGISTRY and _REGISTRY[cls.key] is not cls:
        raise ValueError(f"objective key {cls.key!r} registered twice")
    _REGISTRY[cls.key] = cls
    return cls


def get_objective(key: str) -> type[Objective]:
    if key not in _REGISTRY:
        raise KeyError(f"unknown objective {key!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_objectives() -> list[str]:
    return sorted(_REGISTRY)
