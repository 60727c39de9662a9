"""The exported part of every objective: an image encoder and, for image-text models, a text encoder.

Objectives hold an ``EmbeddingModel`` plus their training-only heads (projectors, predictors, queues);
``save_model`` writes just this model as ``config.json`` + ``model.safetensors``, the directory that
``trainer.evaluate`` and ``export`` read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .backbones import build_backbone
from .text import TextConfig, build_text_tower

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    backbone: str = "resnet18-cifar"
    image_size: int = 32
    channels: int = 3
    mean: list[float] | None = None  # None: the backbone's default
    std: list[float] | None = None
    image_projection: int | None = None  # linear projection after the backbone (image-text models)
    text: TextConfig | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        text = data.get("text")
        data["text"] = TextConfig(**text) if text else None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class EmbeddingModel(nn.Module):
    """Image encoder (backbone [+ projection]) and optional text encoder sharing one embedding space."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        backbone = build_backbone(config.backbone, config.image_size, config.channels)
        config.mean = list(config.mean or backbone.mean)
        config.std = list(config.std or backbone.std)
        self.config = config
        self.backbone = backbone.module
        self.feature_dim = backbone.feature_dim
        self.image_projection = (
            nn.Linear(backbone.feature_dim, config.image_projection, bias=False)
            if config.image_projection
            else None
        )
        self.embed_dim = config.image_projection or backbone.feature_dim
        self.text = build_text_tower(config.text, self.embed_dim) if config.text else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] normalised images -> [N, embed_dim] (not L2-normalised)."""
        features = self.backbone(images)
        return self.image_projection(features) if self.image_projection is not None else features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] int64 tokens -> [N, embed_dim] (not L2-normalised)."""
        if self.text is None:
            raise RuntimeError("this model has no text encoder")
        return self.text(tokens)


def save_model(model: EmbeddingModel, directory: str, card: dict) -> None:
    """Write ``config.json`` and ``model.safetensors`` atomically: a crash leaves the old directory whole."""
    from safetensors.torch import save_file

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".model-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(staging, WEIGHTS_NAME))
    payload = {
        **card,
        "model": asdict(model.config),
        "embed_dim": model.embed_dim,
        "feature_dim": model.feature_dim,
        "has_text": model.text is not None,
    }
    with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    backup = directory + ".old"
    if os.path.exists(directory):
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(directory, backup)
    os.replace(staging, directory)
    shutil.rmtree(backup, ignore_errors=True)


def load_model(directory: str) -> tuple[EmbeddingModel, dict]:
    """Rebuild the model saved in ``directory``; returns (model in eval mode, the saved config.json)."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory!r} does not exist")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model directory {directory!r} has no {os.path.basename(path)}")
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    model = EmbeddingModel(ModelConfig.from_dict(saved["model"]))
    model.load_state_dict(load_file(weights_path))
    return model.eval(), saved
