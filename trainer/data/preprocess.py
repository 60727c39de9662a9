"""Torch-free evaluation preprocessing, shared by the trainer's evaluation and the ONNX runtime.

One definition keeps training-time evaluation and production feature extraction identical:
resize the shorter side to ``size`` (bicubic), centre-crop ``size`` x ``size``, scale to [0, 1],
normalise by mean/std, channels first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Preprocess:
    """How an image becomes the encoder's input tensor; stored in ``preprocess.json``."""

    image_size: int = 32
    channels: int = 3
    mean: list[float] = field(default_factory=lambda: list(CIFAR_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR_STD))
    resize: str = "bicubic"
    crop: str = "center"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_model(cls, config) -> "Preprocess":
        """The recipe of a model's config (``trainer.models.ModelConfig``: image_size, channels, mean, std)."""
        return cls(image_size=config.image_size, channels=config.channels, mean=list(config.mean),
                   std=list(config.std))

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        known = {k: data[k] for k in ("image_size", "channels", "mean", "std", "resize", "crop") if k in data}
        return cls(**known)


def resize_center_crop(image, size: int):
    """Resize the shorter side to ``size`` with bicubic filtering, then centre-crop a square."""
    from PIL import Image

    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def preprocess_image(image, spec: Preprocess) -> np.ndarray:
    """A PIL image -> float32 array [C, H, W], normalised as the encoder expects."""
    image = image.convert("L" if spec.channels == 1 else "RGB")
    image = resize_center_crop(image, spec.image_size)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess_batch(images, spec: Preprocess) -> np.ndarray:
    """A list of PIL images -> float32 array [N, C, H, W]."""
    if not images:
        return np.zeros((0, spec.channels, spec.image_size, spec.image_size), dtype=np.float32)
    return np.stack([preprocess_image(image, spec) for image in images])
