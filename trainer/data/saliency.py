"""Background augmentation (Ryali, Schwab & Morcos 2021, "Characterizing and Improving the Robustness of
Self-Supervised Learning through Background Augmentation") with foreground masks from classical saliency.

The paper takes foreground masks from an unsupervised saliency network (DeepUSPS); nothing is downloaded here,
so the mask comes from a classical method computed on the image itself, as tensor ops:

* ``boundary_contrast`` (the default): the frequency-tuned saliency of Achanta et al. 2009 with a boundary
  prior: the Lab distance of each (slightly blurred) pixel from the mean colour of the image border, > 1.5 x
  its mean (Achanta's 2 x mean drops most of a CIFAR object). Small object-centric images have their
  background on the border.
* ``frequency_tuned`` (Achanta et al. 2009 as published): the distance from the mean colour of the whole
  image, > 2 x its mean.
Spectral residual (Hou & Zhang 2007) was tried and left out: on 32 px images (CIFAR-10, judged by eye on 16
training images) and on a flat square it marks edges, corners and textured background, not the object.

Clean-up (``clean_mask``): a 3x3 closing, the connected component holding the most salient pixel (flood fill by
repeated 3x3 max-pooling inside the mask), holes filled (background not connected to the border); a mask
covering less than ``min_area`` or more than ``max_area`` of the image is rejected and that image is left as it is.

``BackgroundAugment`` (``AugmentConfig.background_prob`` / ``background_mode``, applied to the PIL image before
the crop) replaces the background, with probability p per view, by:
* ``remove`` (the paper's BG_RM): a constant mid-grey, which is about 0 after mean/std normalisation;
* ``random`` (BG_Random): the background of another image, taken from a small reservoir of recent images in
  each data worker; that image's own foreground is filled with its background's mean colour so it brings no
  second object;
* ``noise``: Gaussian noise with the image's own per-channel mean and standard deviation.
Foreground pixels are copied unchanged. The paper's BG_Swaps (MoCo hard negatives sharing a background)
needs coordination between views and the queue and is not provided. As far as we recall the paper, BG_RM and
BG_Random helped most at small probabilities (about 0.1-0.2 per view); the recipes leave the option off
(``background_prob: 0``) and ``background_prob: 0.2`` is the suggested setting.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

METHODS = ("boundary_contrast", "frequency_tuned")
MODES = ("remove", "random", "noise")
_MAX_SIDE = 64  # saliency is computed on a thumbnail of at most 64 px a side, the mask upsampled


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """[C, H, W] blurred by a separable Gaussian (reflect padding)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def colour_contrast_saliency(rgb: torch.Tensor, reference: str = "border") -> torch.Tensor:
    """[C, H, W] in [0, 1] -> [H, W]: the Lab distance of the slightly blurred image from a reference colour,
    the mean of the image border (``border``: boundary prior) or of the whole image (``image``: Achanta's
    frequency-tuned saliency). One-channel images use their intensity x 100 as L."""
    from trainer.data.lab import rgb_to_lab

    colours = rgb_to_lab(rgb.permute(1, 2, 0)) if rgb.shape[0] == 3 else rgb.permute(1, 2, 0) * 100.0
    colours = _gaussian_blur(colours.permute(2, 0, 1), 0.5)                    # [C, H, W]; wider blurs grow the mask
    if reference == "border":
        pixels = torch.cat([colours[:, 0], colours[:, -1], colours[:, 1:-1, 0], colours[:, 1:-1, -1]], dim=1)
    else:
        pixels = colours.flatten(1)
    return (colours - pixels.mean(dim=1)[:, None, None]).norm(dim=0)


def _grow(seed: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """The pixels of ``inside`` 8-connected to ``seed`` (both [H, W] bool): repeated 3x3 max-pooling."""
    region = seed & inside
    while True:
        grown = F.max_pool2d(region[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & inside
        if torch.equal(grown, region):
            return region
        region = grown


def clean_mask(mask: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Closing, keep the component of the saliency peak, fill holes. [H, W] bool -> [H, W] bool."""
    m = mask[None, None].float()
    m = F.max_pool2d(m, 3, stride=1, padding=1)                                # dilate
    m = -F.max_pool2d(-m, 3, stride=1, padding=1)                              # erode (closing)
    closed = m[0, 0].bool() | mask
    if not closed.any():
        return closed
    peak = torch.zeros_like(closed).flatten()
    peak[torch.where(closed.flatten(), saliency.flatten(), torch.full_like(saliency.flatten(), -1.0)).argmax()] = True
    component = _grow(peak.view_as(closed), closed)
    border = torch.zeros_like(component)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    outside = _grow(border, ~component)                                        # background reachable from the border
    return ~outside


def foreground_mask(image: torch.Tensor, method: str = "boundary_contrast", min_area: float = 0.05,
                    max_area: float = 0.85) -> torch.Tensor | None:
    """[C, H, W] image in [0, 1] -> [H, W] bool foreground mask, or None when the cleaned mask covers less than
    ``min_area`` or more than ``max_area`` of the image (no usable foreground)."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; known: {', '.join(METHODS)}")
    height, width = image.shape[-2:]
    scale = min(1.0, _MAX_SIDE / max(height, width))
    small = image if scale == 1.0 else F.interpolate(image[None], scale_factor=scale, mode="area")[0]
    if method == "boundary_contrast":
        saliency = colour_contrast_saliency(small, "border")
        threshold = 1.5 * saliency.mean()
    else:
        saliency = colour_contrast_saliency(small, "image")
        threshold = 2.0 * saliency.mean()                                     # Achanta's adaptive threshold
    mask = clean_mask(saliency > threshold, saliency)
    if scale != 1.0:
        mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0].bool()
    area = mask.float().mean().item()
    return mask if min_area <= area <= max_area else None


def replace_background(image: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``image`` where ``mask`` (foreground), ``background`` elsewhere; [C, H, W] each, mask [H, W]."""
    return torch.where(mask[None], image, background)


class BackgroundAugment:
    """PIL image -> PIL image with its background replaced with probability ``prob`` (see the module doc).
    Picklable; the ``random`` mode's reservoir lives in each data worker's copy."""

    def __init__(self, prob: float, mode: str = "remove", method: str = "boundary_contrast", reservoir: int = 16):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"background_prob must be in [0, 1], got {prob}")
        if mode not in MODES:
            raise ValueError(f"unknown background_mode {mode!r}; known: {', '.join(MODES)}")
        if method not in METHODS:
            raise ValueError(f"unknown background_saliency {method!r}; known: {', '.join(METHODS)}")
        self.prob, self.mode, self.method, self.reservoir_size = prob, mode, method, reservoir
        self.reservoir: list[torch.Tensor] = []

    def __repr__(self) -> str:
        return f"BackgroundAugment(prob={self.prob}, mode={self.mode!r}, method={self.method!r})"

    def __getstate__(self):
        return {**self.__dict__, "reservoir": []}

    def _background(self, pixels: torch.Tensor) -> torch.Tensor:
        """A uint8 [C, H, W] background for ``pixels`` (uint8 [C, H, W])."""
        if self.mode == "noise":
            flat = pixels.float().flatten(1)
            noise = torch.randn_like(pixels, dtype=torch.float32) * flat.std(1)[:, None, None] + flat.mean(1)[:, None, None]
            return noise.round().clamp(0, 255).to(torch.uint8)
        if self.mode == "random" and self.reservoir:
            other = self.reservoir[int(torch.randint(len(self.reservoir), ()))]
            if other.shape != pixels.shape:
                other = TF.resize(other, list(pixels.shape[-2:]), antialias=True)
            return other
        return torch.full_like(pixels, 128)

    def _remember(self, pixels: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep the image's background (foreground filled with the background's mean colour) for ``random``."""
        mean = pixels.float()[:, ~mask].mean(dim=1).round().to(torch.uint8)
        self.reservoir.append(torch.where(mask[None], mean[:, None, None], pixels))
        del self.reservoir[:-self.reservoir_size]

    def __call__(self, image):
        if not bool(torch.rand(()) < self.prob):
            return image
        pixels = TF.pil_to_tensor(image)                                           # uint8 [C, H, W]
        mask = foreground_mask(pixels.float() / 255.0, self.method)
        if mask is None:
            return image
        result = replace_background(pixels, mask, self._background(pixels))
        if self.mode == "random":  # later images get this one's background (the first falls back to grey)
            self._remember(pixels, mask)
        return TF.to_pil_image(result, mode=image.mode)
