"""What a test needs to build any registered objective at test size: the small backbone it runs on and the
weights or teacher it must start from (objectives that refuse to start without them)."""
from __future__ import annotations

from pathlib import Path

import trainer.objectives  # noqa: F401  (registration)
from trainer.objectives import get_objective


def smoke_backbone(key: str) -> str:
    """The small backbone a test runs ``key`` on: a ViT for objectives that need patch tokens, else cnn-small."""
    return "vit-micro-cifar" if get_objective(key).requires_patch_tokens else "cnn-small"


def start_weights_args(key: str, tmp_path: Path) -> dict:
    """``ObjectiveSpec`` fields ``key`` needs beyond its recipe: objectives that start from the user's weights
    (LiT's locked image tower) get a plain randomly initialised RUN/model of the smoke backbone as ``init_from``."""
    if not getattr(get_objective(key), "requires_init_from", False):
        return {}
    from trainer.models import EmbeddingModel, ModelConfig, save_model

    weights = tmp_path / "init"
    save_model(EmbeddingModel(ModelConfig(backbone=smoke_backbone(key), image_size=32)), str(weights),
               {"objective": "init"})
    return {"init_from": str(weights)}
