"""Multi-task training (Piergiovanni, Angelova & Ryoo 2020, "Evolving Losses for Unsupervised Video
Representation Learning"): a weighted sum of registered objectives that share ONE backbone.

``objective: {tasks: {rotation: {weight: 1.0, options: {}}, simclr: {weight: 1.0, options: {temperature: 0.5}}}}``
builds every task from the registry with its own options, then hands all of them the first task's
``EmbeddingModel`` (registered once, in the first task; ``self.encoder`` is what gets exported): each task
keeps its own heads, views, buffers and hooks, and the loss is sum_k w_k L_k. The weights are a buffer (saved
in checkpoints, ``--resume`` restores them) and settable (``set_weights``): the Evolving Losses search
(``trainer.evolve``) tunes them.

Sharing is checked rather than assumed, so a task that cannot share a backbone fails at build time with a
ValueError saying why: its encoder must have the same ``ModelConfig``, the same module types and trainable
parameters, and the task must not keep its own references into the encoder it was built with. Momentum
teachers are re-initialised from the shared encoder (teacher and student start equal, as in the papers) and
their EMA then follows it. Supported (on a plain CNN backbone): align_uniform, barlow_twins, byol, context,
counting, curl, dino, exemplar, jigsaw, jigsaw_clustering, moco, moco2, moco3, patchnce, pixpro, rotation,
simclr, simsiam, supcon, swav. Refused: clip (image-text model), cmc and colorization (colour-split input),
cpc/cpc2 (patch-grid encoder), simclr2 (exported head layers), instdisc/invaspread (exported projection; they
combine only with each other), moco3 on a ViT beside a task that trains the patch projection it freezes, and
``multitask`` itself.

Data: every task's view recipe runs on the same image; its outputs are prefixed by the task key
(``"simclr/view0"``) and ``forward`` hands each task its own keys back without the prefix, plus the keys
every task shares (``label``, ``id``). Metrics: ``loss/<task>`` (unweighted), ``<task>/<metric>``, and
``embedding_std`` = the lowest any task reports (the loop's collapse flag then fires if any head collapses).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from trainer.models import EmbeddingModel

from .base import Objective, ObjectiveSpec, get_objective, register

SEPARATOR = "/"


@dataclass
class MultitaskOptions:
    # task key -> {"weight": float >= 0, "options": the task's own option mapping}; order = build order, and
    # the first task's encoder is the shared one.
    tasks: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.tasks, Mapping) or len(self.tasks) < 1:
            raise ValueError("multitask: 'tasks' must map at least one objective key to {weight, options}")
        parsed = {}
        for key, entry in self.tasks.items():
            entry = {} if entry is None else entry
            if not isinstance(entry, Mapping) or set(entry) - {"weight", "options"}:
                raise ValueError(f"multitask: task {key!r} must be a mapping with 'weight' and 'options', got {entry!r}")
            weight = entry.get("weight", 1.0)
            try:
                weight = float(weight)  # YAML reads "1e-3" (no dot) as a string
            except (TypeError, ValueError):
                raise ValueError(f"multitask: task {key!r}: weight must be a number, got {weight!r}") from None
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"multitask: task {key!r}: weight must be finite and >= 0, got {weight}")
            options = entry.get("options") or {}
            if not isinstance(options, Mapping):
                raise ValueError(f"multitask: task {key!r}: options must be a mapping, got {options!r}")
            parsed[str(key)] = {"weight": weight, "options": dict(options)}
        if not any(e["weight"] > 0 for e in parsed.values()):
            raise ValueError("multitask: at least one task weight must be > 0")
        self.tasks = parsed


class MultitaskViews:
    """Picklable view recipe: every task's recipe on the same image, outputs prefixed ``"<task>/<name>"``."""

    def __init__(self, recipes: Mapping):
        self.recipes = dict(recipes)

    def __call__(self, image, sample) -> dict:
        out = {}
        for key, recipe in self.recipes.items():
            for name, value in recipe(image, sample).items():
                out[f"{key}{SEPARATOR}{name}"] = value
        return out


def split_batch(batch: Mapping, keys: Sequence[str]) -> dict[str, dict]:
    """Per task: its own prefixed entries without the prefix, plus every unprefixed (shared) entry."""
    shared = {name: value for name, value in batch.items() if SEPARATOR not in name}
    parts = {key: dict(shared) for key in keys}
    for name, value in batch.items():
        key, sep, rest = name.partition(SEPARATOR)
        if sep and key in parts:
            parts[key][rest] = value
    return parts


def _signature(encoder: nn.Module) -> tuple[list, list]:
    return ([(n, type(m).__name__) for n, m in encoder.named_modules()],
            [(n, tuple(p.shape), p.requires_grad) for n, p in encoder.named_parameters()])


def _share_encoder(key: str, task: Objective, shared: EmbeddingModel) -> None:
    """Make ``task`` use ``shared`` as its encoder, or raise ValueError saying why it cannot."""
    own = task.encoder
    if own.config != shared.config:
        differ = [f.name for f in dataclasses.fields(own.config)
                  if getattr(own.config, f.name) != getattr(shared.config, f.name)]
        raise ValueError(f"multitask: task {key!r} builds a different encoder (ModelConfig differs in {differ}), "
                         f"so it cannot share one backbone with the other tasks")
    if _signature(own) != _signature(shared):
        raise ValueError(f"multitask: task {key!r} changes its encoder at construction (module types or frozen "
                         f"parameters differ from the shared encoder's), so it cannot share one backbone")
    alive = [weakref.ref(m) for m in own.modules()]
    # A plain attribute, not a submodule: the backbone is registered once (in the first task), so the state
    # dict, the optimizer groups and DDP see each of its parameters once. Module-wide operations (.to, .train,
    # sync-BN conversion) still reach it through the first task and keep its identity.
    del task._modules["encoder"]
    object.__setattr__(task, "encoder", shared)
    del own
    gc.collect()
    if any(ref() is not None for ref in alive):
        raise ValueError(f"multitask: task {key!r} keeps its own references into the encoder it was built with, "
                         f"so it cannot share one backbone")
    for name, module in task.named_modules():
        if isinstance(module, EmbeddingModel) and module is not shared:
            # A momentum teacher copied from the task's own encoder: restart it from the shared one.
            try:
                module.load_state_dict(shared.state_dict())
            except RuntimeError as error:
                raise ValueError(f"multitask: task {key!r}: its teacher {name!r} cannot be re-initialised from the "
                                 f"shared encoder: {error}") from None


def _task_classes(options: dict) -> list[tuple[type[Objective], dict]]:
    """(objective class, its options) of each task of raw multitask options; unknown keys are left to the
    constructor's error."""
    parsed = MultitaskOptions(**{k: v for k, v in options.items() if k == "tasks"})
    out = []
    for key, entry in parsed.tasks.items():
        try:
            out.append((get_objective(key), entry["options"]))
        except KeyError:
            continue
    return out


@register
class Multitask(Objective):
    key = "multitask"
    Options = MultitaskOptions

    @classmethod
    def needs_text(cls, options: dict) -> bool:
        return any(task.needs_text(task_options) for task, task_options in _task_classes(options))

    @classmethod
    def needs_dense_ids(cls, options: dict) -> bool:
        return any(task.needs_dense_ids(task_options) for task, task_options in _task_classes(options))

    def __init__(self, spec: ObjectiveSpec, options: MultitaskOptions):
        nn.Module.__init__(self)  # no encoder of its own: the first task's is shared
        self.spec, self.options = spec, options
        tasks: dict[str, Objective] = {}
        for key, entry in options.tasks.items():
            if key == self.key:
                raise ValueError("multitask: a task cannot itself be 'multitask'")
            try:
                task_cls = get_objective(key)
            except KeyError as error:
                raise ValueError(f"multitask: {error.args[0]}") from None
            tasks[key] = task_cls.build(dataclasses.replace(spec, options=dict(entry["options"])))
        shared = next(iter(tasks.values())).encoder
        for key, task in list(tasks.items())[1:]:
            _share_encoder(key, task, shared)
        self.tasks = nn.ModuleDict(tasks)
        self.register_buffer("weights", torch.tensor([e["weight"] for e in options.tasks.values()], dtype=torch.float32))

    @property
    def encoder(self) -> EmbeddingModel:
        """The shared encoder (what gets exported), registered in the first task."""
        return next(iter(self.tasks.values())).encoder

    @property
    def task_keys(self) -> list[str]:
        return list(self.tasks.keys())

    def task_weights(self) -> dict[str, float]:
        return dict(zip(self.task_keys, self.weights.tolist()))

    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """Set the loss weights: a mapping over every task key, or a sequence in task order."""
        if isinstance(weights, Mapping):
            if set(weights) != set(self.task_keys):
                raise ValueError(f"multitask: weights must name exactly the tasks {self.task_keys}, got {sorted(weights)}")
            values = [float(weights[k]) for k in self.task_keys]
        else:
            values = [float(w) for w in weights]
            if len(values) != len(self.task_keys):
                raise ValueError(f"multitask: {len(self.task_keys)} weights expected, got {len(values)}")
        if not all(math.isfinite(w) and w >= 0 for w in values) or not any(w > 0 for w in values):
            raise ValueError(f"multitask: weights must be finite, >= 0 and not all zero, got {values}")
        self.weights.copy_(torch.tensor(values, dtype=self.weights.dtype))

    def views(self) -> MultitaskViews:
        return MultitaskViews({key: task.views() for key, task in self.tasks.items()})

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        parts = split_batch(batch, self.task_keys)
        loss = None
        metrics: dict[str, torch.Tensor] = {}
        spreads = []
        for index, (key, task) in enumerate(self.tasks.items()):
            outputs = task(parts[key])
            weighted = self.weights[index] * outputs["loss"]
            loss = weighted if loss is None else loss + weighted
            metrics[f"loss{SEPARATOR}{key}"] = outputs["loss"].detach()
            for name, value in outputs.items():
                if name != "loss":
                    metrics[f"{key}{SEPARATOR}{name}"] = value
            if "embedding_std" in outputs:
                spreads.append(outputs["embedding_std"])
        if spreads:
            metrics["embedding_std"] = torch.stack([s.detach().float() for s in spreads]).min()
        return {"loss": loss, **metrics}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        for task in self.tasks.values():
            task.before_optimizer_step(step, total_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        for task in self.tasks.values():
            task.after_step(step, total_steps)

    def model_card_extras(self) -> dict:
        return {key: value for task in self.tasks.values() for key, value in task.model_card_extras().items()}

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Every task's own groups; the backbone is in the first task's (each parameter listed once)."""
        seen: set[int] = set()
        groups = []
        for task in self.tasks.values():
            for group in task.parameter_groups(weight_decay):
                params = [p for p in group["params"] if id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    groups.append({**group, "params": params})
        return groups
