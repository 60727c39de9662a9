"""What a test needs to build any registered objective at test size: the small backbone it runs on and the
weights or teacher it must start from (objectives that refuse to start without them)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import trainer.objectives  # noqa: F401  (registration)
from trainer.objectives import get_objective


def smoke_backbone(key: str) -> str:
    """The small backbone a test runs ``key`` on: a ViT for objectives that need patch tokens, else cnn-small."""
    return "vit-micro-cifar" if get_objective(key).requires_patch_tokens else "cnn-small"


@dataclass
class StartArgs:
    """What ``key`` needs beyond its recipe, three ways: ``ObjectiveSpec`` fields, objective options, and the same
    as command-line flags."""

    spec: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    cli: list[str] = field(default_factory=list)


def start_args(key: str, tmp_path: Path) -> StartArgs:
    """Objectives that start from the user's weights (LiT's locked image tower: ``requires_init_from``) get a plain
    randomly initialised RUN/model of the smoke backbone through ``init_from``; objectives with a ``teacher``
    option (distill) get a random cnn-small exported to ONNX as their teacher."""
    cls = get_objective(key)
    start = StartArgs()
    if getattr(cls, "requires_init_from", False):
        from trainer.models import EmbeddingModel, ModelConfig, save_model

        weights = tmp_path / "init"
        save_model(EmbeddingModel(ModelConfig(backbone=smoke_backbone(key), image_size=32)), str(weights),
                   {"objective": "init"})
        start.spec["init_from"] = str(weights)
        start.cli += ["--init-from", str(weights)]
    if dataclasses.is_dataclass(cls.Options) and "teacher" in {f.name for f in dataclasses.fields(cls.Options)}:
        from distill_helpers import make_teacher

        teacher = make_teacher(tmp_path / "teacher")["onnx"]
        start.options["teacher"] = teacher
        start.cli += ["--set", f"teacher={teacher}"]
    return start
