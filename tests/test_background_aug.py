"""Background augmentation (Ryali et al. 2021): classical saliency masks find an object, the background is
replaced while the foreground pixels stay as they were, the AugmentConfig options, and a SimCLR run with it."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.saliency import (
    METHODS, BackgroundAugment, clean_mask, foreground_mask, replace_background,
)
from trainer.data.views import AugmentConfig, augmentation


def _square(noise: float, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright 12x12 square off-centre on a dark background with Gaussian noise; (uint8 image, true mask)."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 60.0) + rng.normal(0.0, noise, (size, size, 3))
    truth = np.zeros((size, size), dtype=bool)
    truth[6:18, 12:24] = True
    image[truth] = (230.0, 200.0, 90.0)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _iou(mask: torch.Tensor, truth: np.ndarray) -> float:
    mask = mask.numpy()
    return (mask & truth).sum() / (mask | truth).sum()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("noise", [0.0, 12.0])
def test_mask_finds_a_bright_square(method, noise):
    image, truth = _square(noise)
    mask = foreground_mask(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, method)
    assert mask is not None and _iou(mask, truth) > 0.8, f"{method}, noise {noise}: IoU {_iou(mask, truth):.2f}"


def test_mask_cleaning_and_rejection():
    # Closing bridges a one-pixel gap, the component of the saliency peak is kept, holes are filled.
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[2:8, 2:8] = True
    mask[4, 4] = False                                                     # a hole
    mask[2:8, 5] = False                                                   # a one-pixel slit
    mask[10, 10] = True                                                    # a stray speck
    saliency = torch.zeros(12, 12)
    saliency[3, 3] = 1.0
    cleaned = clean_mask(mask, saliency)
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[2:8, 2:8] = True
    assert torch.equal(cleaned, expected)
    flat = torch.full((3, 32, 32), 0.4)                                    # nothing salient: no mask
    assert foreground_mask(flat) is None
    with pytest.raises(ValueError):
        foreground_mask(flat, "deep_usps")


@pytest.mark.parametrize("mode", ["remove", "noise", "random"])
def test_background_augmentation_keeps_the_foreground_pixels(mode):
    image, _ = _square(8.0)
    augment = BackgroundAugment(1.0, mode)
    torch.manual_seed(0)
    if mode == "random":  # the first image fills the reservoir (and itself falls back to grey)
        donor, _ = _square(8.0, seed=1)
        donor[:, :, 2] = 250  # a blue-ish background to recognise
        augment(Image.fromarray(donor))
        assert len(augment.reservoir) == 1
    out = np.asarray(augment(Image.fromarray(image)))
    mask = foreground_mask(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0).numpy()
    assert mask.mean() > 0.1
    assert np.array_equal(out[mask], image[mask])                          # foreground unchanged, bit for bit
    background = out[~mask].astype(int)
    if mode == "remove":
        assert (background == 128).all()
    elif mode == "random":
        assert (background[:, 2] == 250).mean() > 0.9                      # the donor's background
    else:
        assert np.abs(background - image[~mask]).mean() > 3
    # Probability 0 (or a mask that is rejected) leaves the image as it is.
    assert np.array_equal(np.asarray(BackgroundAugment(0.0, mode)(Image.fromarray(image))), image)
    flat = Image.new("RGB", (32, 32), (90, 90, 90))
    assert np.array_equal(np.asarray(BackgroundAugment(1.0, mode)(flat)), np.asarray(flat))


def test_replace_background_and_grayscale_images():
    image = torch.arange(2 * 3 * 3).view(2, 3, 3)
    mask = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    out = replace_background(image, mask, torch.full_like(image, -1))
    assert torch.equal(out[:, mask], image[:, mask]) and (out[:, ~mask] == -1).all()
    gray, _ = _square(0.0)
    result = BackgroundAugment(1.0, "remove")(Image.fromarray(gray).convert("L"))
    assert result.mode == "L" and result.size == (32, 32)


def test_augment_config_options_and_pipeline_order():
    config = AugmentConfig(background_prob=0.2, background_mode="random", background_saliency="frequency_tuned")
    steps = augmentation(32, [0.5] * 3, [0.5] * 3, config).transforms
    assert isinstance(steps[0], BackgroundAugment) and steps[0].prob == 0.2  # before the crop
    assert not any(isinstance(s, BackgroundAugment) for s in augmentation(32, [0.5] * 3, [0.5] * 3, AugmentConfig()).transforms)
    steps[0].reservoir.append(torch.zeros(3, 2, 2, dtype=torch.uint8))
    assert pickle.loads(pickle.dumps(steps[0])).reservoir == []            # workers start with their own reservoir
    for bad in ({"background_prob": 1.5}, {"background_mode": "blur"}, {"background_saliency": "deep"}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
