"""View recipes: what the data workers make of one decoded image (and its caption) for an objective.

Each recipe is a picklable callable ``(PIL image, ShardSample) -> {name: tensor}`` so that it runs inside
data-loader worker processes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchvision import transforms as T

from .saliency import BackgroundAugment


@dataclass
class AugmentConfig:
    """SimCLR's augmentation family, scaled for small images (blur off at 32 px as in the paper)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip: float = 0.5
    jitter_strength: float = 0.5  # s in the paper: brightness/contrast/saturation 0.8s, hue 0.2s
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    solarize_prob: float = 0.0  # BYOL: invert pixels >= 0.5 (128 of 255) with this probability, after blur
    channels: int = 3
    # Background augmentation (Ryali et al. 2021; trainer.data.saliency), on the whole image before the crop:
    # with this probability the background outside a classical saliency mask is replaced.
    background_prob: float = 0.0
    background_mode: str = "remove"  # remove (BG_RM, grey) | random (BG_Random, another image's) | noise
    background_saliency: str = "boundary_contrast"  # boundary_contrast | frequency_tuned

    def __post_init__(self):
        BackgroundAugment(self.background_prob, self.background_mode, self.background_saliency)  # ValueError if bad


def augmentation(size: int, mean, std, config: AugmentConfig) -> T.Compose:
    """Optional background augmentation, random resized crop, flip, colour jitter, grayscale, optional blur and
    solarize, then normalise."""
    s = config.jitter_strength
    steps: list = []
    if config.background_prob > 0:  # on the whole image, so every crop of it has the same foreground mask
        steps.append(BackgroundAugment(config.background_prob, config.background_mode, config.background_saliency))
    steps.append(T.RandomResizedCrop(size, scale=tuple(config.crop_scale), antialias=True))
    if config.flip > 0:
        steps.append(T.RandomHorizontalFlip(config.flip))
    if config.jitter_prob > 0 and s > 0:
        steps.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=config.jitter_prob))
    if config.grayscale_prob > 0:
        steps.append(T.RandomGrayscale(config.grayscale_prob))
    if config.blur_prob > 0:
        kernel = max(3, (size // 10) | 1)  # ~10% of the image side, odd
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=config.blur_prob))
    if config.solarize_prob > 0:
        steps.append(T.RandomSolarize(threshold=128, p=config.solarize_prob))  # on the PIL image: 0.5 of 255
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def view_configs(augment: dict, second_view_augment: dict | None = None) -> tuple[AugmentConfig, AugmentConfig | None]:
    """``AugmentConfig``s for view0 and view1 from option mappings: view1's is view0's with
    ``second_view_augment`` laid over it (None when that is empty: both views share one recipe).
    Unknown field names raise ValueError."""
    try:
        first = AugmentConfig(**augment)
        second = AugmentConfig(**{**augment, **second_view_augment}) if second_view_augment else None
    except TypeError as error:
        known = ", ".join(f.name for f in dataclasses.fields(AugmentConfig))
        raise ValueError(f"augment: {error}; known fields: {known}") from None
    return first, second


class OneView:
    """One augmented copy ``image`` of each image (objectives that split, tile or rotate it themselves)."""

    def __init__(self, size: int, mean, std, config: AugmentConfig):
        self.transform = augmentation(size, mean, std, config)

    def __call__(self, image, sample) -> dict:
        return {"image": self.transform(image)}


class TwoViews:
    """Two independently augmented views ``view0``/``view1`` of the same image (SimCLR, MoCo, BYOL, ...).

    ``second_config`` gives view1 its own recipe (BYOL's asymmetric views: blur 1.0 / 0.1, solarize 0 / 0.2);
    without it both views use ``config``.
    """

    def __init__(self, size: int, mean, std, config: AugmentConfig | None = None,
                 second_config: AugmentConfig | None = None):
        # Kept so that trainer.data.batched_augment can rebuild the recipe as batched ops on the device.
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.config, self.second_config = config or AugmentConfig(), second_config
        self.transform = augmentation(size, mean, std, self.config)
        self.second_transform = augmentation(size, mean, std, second_config) if second_config else self.transform

    def __call__(self, image, sample) -> dict:
        return {"view0": self.transform(image), "view1": self.second_transform(image)}


class ManyViews:
    """``num_views`` independently augmented views ``view0`` ... ``view{k-1}`` of the same image, all from one
    recipe (MMCR's k views per image, FastSiam's 4, EMP-SSL's many fixed-size patches). ``stack_views``
    turns a collated batch of them into one [N, k, C, H, W] tensor."""

    def __init__(self, size: int, mean, std, config: AugmentConfig, num_views: int):
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2, got {num_views}")
        self.num_views = int(num_views)
        self.transform = augmentation(size, mean, std, config)

    def keys(self) -> list[str]:
        return [f"view{i}" for i in range(self.num_views)]

    def __call__(self, image, sample) -> dict:
        return {key: self.transform(image) for key in self.keys()}


def stack_views(batch: dict, num_views: int) -> torch.Tensor:
    """The views ``view0`` ... ``view{num_views-1}`` of a collated batch as one [N, num_views, C, H, W] tensor;
    a missing view is a KeyError naming it."""
    missing = [f"view{i}" for i in range(num_views) if f"view{i}" not in batch]
    if missing:
        raise KeyError(f"batch lacks views {missing}; it has {sorted(batch)}")
    return torch.stack([batch[f"view{i}"] for i in range(num_views)], dim=1)


class ImageText:
    """One lightly augmented image and its tokenized caption (CLIP)."""

    def __init__(self, size: int, mean, std, context_length: int, crop_scale=(0.8, 1.0)):
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
        self.context_length = context_length
        self._tokenizer = None  # built lazily in each worker: the BPE tables are large to pickle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def tokenize(self, text: str) -> torch.Tensor:
        if self._tokenizer is None:
            from trainer.models.text import build_tokenizer

            self._tokenizer = build_tokenizer(self.context_length)
        return self._tokenizer([text])[0]

    def __call__(self, image, sample) -> dict:
        caption = sample.caption or (sample.meta.get("label") if isinstance(sample.meta, dict) else "") or ""
        return {"image": self.transform(image), "tokens": self.tokenize(caption)}
