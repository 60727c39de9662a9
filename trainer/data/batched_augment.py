"""SimCLR's augmentation family on a whole uint8 batch, on the training device, as tensor operations.

Data workers then only decode (``DecodedImage``: a fixed-size uint8 image per sample) and the loop turns
``batch["image_uint8"]`` into ``view0``/``view1`` on the GPU (``DeviceTwoViews.on_device``), so augmentation
no longer bounds images/s by the number of CPU cores. ``BatchedAugment`` follows ``trainer.data.views.augmentation``
step for step, in the same order (crop, flip, jitter, grayscale, blur, solarize, normalise), with per-sample random
parameters from the same distributions, drawn from a seedable ``torch.Generator``:

* Random resized crop: torchvision's ``RandomResizedCrop.get_params`` vectorised. Each sample draws 10 candidate
  (area fraction uniform in ``crop_scale``, aspect ratio log-uniform in ``ratio``) boxes at once, keeps the first
  that fits (same rounding: ``round`` half to even, as Python's), else the centre-crop fallback; the offset is
  uniform over the valid positions. Resizing is bilinear sampling with ``grid_sample``
  (``align_corners=False``), with the source coordinates clamped to the box's edge pixels, which is exactly what
  ``resized_crop`` + bilinear resize computes when the box is not larger than the output (upsampling; the tests check
  1e-5). No antialiasing: with ``pre_size`` equal to ``size`` (the default) every crop is at most ``size`` wide, so
  resizing only ever upsamples; with a larger ``pre_size`` the largest downscale is ``pre_size / size``
  (e.g. 256 -> 224), where bilinear without antialias differs little. The horizontal flip is folded into the
  sampling grid (free).
* Colour jitter (probability ``jitter_prob``): brightness, contrast, saturation factors uniform in
  ``[max(0, 1 - 0.8 s), 1 + 0.8 s]``, hue shift uniform in ``[-0.2 s, 0.2 s]``, the four applied in a random order
  per sample as ``ColorJitter`` does. Vectorised by grouping: at each of the 4 positions of the order, every op
  is applied to the samples whose permutation puts it there, so each sample gets exactly its 4 ops in its order
  and the work equals one op per sample per position. The formulas are torchvision's tensor ones
  (``adjust_brightness``/``contrast``/``saturation``/``hue``; hue through HSV).
* Grayscale (``grayscale_prob``): ITU-R 601 luma (0.2989, 0.587, 0.114) copied to the 3 channels.
* Gaussian blur (``blur_prob``): sigma uniform in [0.1, 2.0] per sample, kernel ``max(3, (size // 10) | 1)``
  (as ``augmentation``), reflect padding, one grouped separable convolution with per-sample kernels.
* Solarize (``solarize_prob``): ``x -> 1 - x`` where ``x >= 127.5 / 255``, i.e. where the value rounded to uint8
  is >= 128, as PIL's ``solarize(threshold=128)`` on the rounded image.
* ``/ 255`` and mean/std normalisation; returns float32 ``[N, C, size, size]``.

One channel: grayscale, saturation and hue are no-ops (as in torchvision), brightness and contrast apply.
Differences from the per-image PIL recipe, all small: PIL rounds to uint8 after every step and antialiases
downscaling, this works in float32 throughout; crops come from the fixed ``pre_size`` centre square made by the
worker, not from the whole (possibly non-square) original image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from .views import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # RandomResizedCrop.get_params tries 10 boxes before the centre crop
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def blur_kernel_size(size: int) -> int:
    """The blur kernel of ``trainer.data.views.augmentation``: ~10% of the image side, odd, at least 3."""
    return max(3, (size // 10) | 1)


@dataclass
class AugmentParams:
    """Per-sample random parameters of one ``BatchedAugment`` draw (all tensors have N rows).

    ``boxes``: [N, 4] (top, left, height, width) in pixels of the input; ``flip``, ``jitter``, ``gray``, ``blur``,
    ``solarize``: [N] bool; ``factors``: [N, 4] brightness, contrast, saturation factors and hue shift;
    ``order``: [N, 4] the permutation of the jitter ops (BRIGHTNESS..HUE); ``sigma``: [N] blur sigma."""

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator | None = None,
               device=None) -> torch.Tensor:
    """``n`` draws of ``RandomResizedCrop.get_params`` for a ``height`` x ``width`` image: [n, 4] float
    (top, left, h, w) with integral values."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(n, CROP_ATTEMPTS, 2, generator=generator, device=device, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_low + (log_high - log_low) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(dim=1)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # index of the first True (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height  # the fallback: centre crop of the whole image at the nearest allowed ratio
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    offsets = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.where(found, torch.floor(offsets[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(offsets[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear resize of each sample's box (top, left, h, w) to ``size`` x ``size``, mirrored where ``flip``.

    Source coordinates (half-pixel centres, as ``interpolate(align_corners=False)``) are clamped to the box's
    edge pixels, so an upsampled box equals ``resized_crop`` of that box exactly."""
    n, _, height, width = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(dim=1)
    steps = torch.arange(size, device=images.device, dtype=torch.float32) + 0.5
    xs = left[:, None] + steps[None, :] * (w / size)[:, None] - 0.5
    ys = top[:, None] + steps[None, :] * (h / size)[:, None] - 0.5
    xs = torch.minimum(torch.maximum(xs, left[:, None]), (left + w - 1)[:, None])
    ys = torch.minimum(torch.maximum(ys, top[:, None]), (top + h - 1)[:, None])
    if flip is not None:
        xs = torch.where(flip.to(images.device)[:, None], xs.flip(1), xs)
    gx = (2 * xs + 1) / width - 1  # grid_sample's normalised coordinates (align_corners=False)
    gy = (2 * ys + 1) / height - 1
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``factor * x + (1 - factor) * other`` clamped to [0, 1], per-sample factors."""
    return torch.lerp(other.expand_as(x), x, factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _gray(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(x, _gray(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` per sample: RGB -> HSV, ``h = (h + shift) mod 1``, HSV -> RGB.

    Written without the HSV image: the value v = max and chroma = max - min are unchanged by a hue shift, and
    channel n (R: 5, G: 3, B: 1) of the result is ``v - chroma * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6``, the closed form of torchvision's six-sector ``_hsv2rgb`` (~3x faster)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    divisor = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    sector = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r) + 2 * chroma, (r - g) + 4 * chroma))
    hue6 = torch.remainder(sector / divisor + 6.0 * shift.view(-1, 1, 1), 6.0).unsqueeze(1)  # 6 h in [0, 6)
    k = torch.remainder(hue6 + torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * weight


JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each sample with ``apply`` gets the 4 ops in its own ``order`` ([N, 4] permutation of BRIGHTNESS..HUE):
    at position k, op ``j`` runs on the samples whose ``order[:, k] == j`` (grouped by op, not looped by sample)."""
    x = x.clone()
    for position in range(4):
        for op, fn in JITTER_OPS.items():
            index = torch.nonzero(apply & (order[:, position] == op)).squeeze(1)
            if index.numel():
                x[index] = fn(x[index], factors[index, op])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur (torchvision's kernel: ``linspace(-k//2, k//2, k)``, normalised), reflect padding,
    as one grouped separable convolution (one kernel per sample and channel)."""
    n, c, height, width = x.shape
    half = (kernel_size - 1) * 0.5
    taps = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.to(x)[:, None]).pow(2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*C, k]
    pad = kernel_size // 2
    flat = F.pad(x.reshape(1, n * c, height, width), [pad, pad, pad, pad], mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, height, width)


def _where_rows(mask: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), changed, x)


class BatchedAugment:
    """``augmentation(size, mean, std, config)`` for a whole uint8 batch ``[N, C, H, W]`` (C = 1 or 3) on the
    batch's device; returns float32 ``[N, C, size, size]``. ``ratio``: the crop's aspect-ratio range
    (torchvision's default)."""

    def __init__(self, size: int, mean, std, config: AugmentConfig | None = None, ratio=(3 / 4, 4 / 3)):
        self.config = config or AugmentConfig()
        lo, hi = self.config.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(self.config.crop_scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if not 0 <= 0.2 * self.config.jitter_strength <= 0.5:
            raise ValueError(f"jitter_strength must be in [0, 2.5] (hue shift 0.2 s <= 0.5), got {self.config.jitter_strength}")
        for name in ("flip", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0 <= getattr(self.config, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self.config, name)}")
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        self.size, self.mean, self.std, self.ratio = int(size), tuple(mean), tuple(std), tuple(ratio)
        self.kernel_size = blur_kernel_size(self.size)

    def sample_params(self, n: int, height: int, width: int, generator: torch.Generator | None = None,
                      device=None) -> AugmentParams:
        """Draw every random parameter for ``n`` samples of a ``height`` x ``width`` batch (on ``generator``'s
        device when one is given, else ``device``)."""
        device = generator.device if generator is not None else device
        c, s = self.config, self.config.jitter_strength

        def uniform(*shape, dtype=torch.float32):
            return torch.rand(*shape, generator=generator, device=device, dtype=dtype)

        boxes = crop_boxes(n, height, width, c.crop_scale, self.ratio, generator, device).float()
        flip = uniform(n) < c.flip
        jitter = (uniform(n) < c.jitter_prob) if s > 0 else torch.zeros(n, dtype=torch.bool, device=device)
        low = torch.tensor([max(0.0, 1 - 0.8 * s)] * 3 + [-0.2 * s], device=device)
        high = torch.tensor([1 + 0.8 * s] * 3 + [0.2 * s], device=device)
        factors = low + (high - low) * uniform(n, 4)
        order = torch.argsort(uniform(n, 4), dim=1)  # a uniformly random permutation per sample
        gray = uniform(n) < c.grayscale_prob
        blur = uniform(n) < c.blur_prob
        sigma = 0.1 + 1.9 * uniform(n)
        solarize = uniform(n) < c.solarize_prob
        return AugmentParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solarize)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The augmentation with the given parameters (``images``: uint8 [N, C, H, W], or float in [0, 1])."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a batch [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
        if images.shape[1] != len(self.mean):
            raise ValueError(f"the batch has {images.shape[1]} channels but mean/std have {len(self.mean)}")
        device = images.device
        params = AugmentParams(**{k: v.to(device) for k, v in vars(params).items()})
        x = resized_crops(images.float(), params.boxes, self.size, params.flip)
        if images.dtype == torch.uint8:
            x = x / 255.0  # after the crop (bilinear sampling commutes with scaling): on the output size
        if params.jitter.any():
            x = color_jitter(x, params.jitter, params.factors, params.order)
        if x.shape[1] == 3 and params.gray.any():
            x = _where_rows(params.gray, _gray(x).expand_as(x), x)
        if params.blur.any():
            index = torch.nonzero(params.blur).squeeze(1)
            x = x.clone()
            x[index] = gaussian_blur(x[index], params.sigma[index], self.kernel_size)
        if params.solarize.any():
            x = _where_rows(params.solarize, torch.where(x >= 127.5 / 255.0, 1.0 - x, x), x)
        mean = torch.tensor(self.mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, _, height, width = images.shape
        return self.apply(images, self.sample_params(n, height, width, generator, images.device))


class DecodedImage:
    """View recipe for data workers: ``(PIL image, sample) -> {"image_uint8": uint8 [C, pre_size, pre_size]}``.

    The shorter side is resized to ``pre_size`` (bilinear, antialiased) and the centre square kept; nothing when
    the image already is ``pre_size`` square (CIFAR at 32 px). The random resized crop then happens on the
    training device, from this fixed-size square (``BatchedAugment``)."""

    def __init__(self, pre_size: int):
        if int(pre_size) < 1:
            raise ValueError(f"pre_size must be a positive number of pixels, got {pre_size}")
        self.pre_size = int(pre_size)

    def __call__(self, image, sample=None) -> dict:
        if image.size != (self.pre_size, self.pre_size):
            image = TF.center_crop(TF.resize(image, self.pre_size, antialias=True), [self.pre_size, self.pre_size])
        return {"image_uint8": TF.pil_to_tensor(image)}


class DeviceTwoViews:
    """``TwoViews`` split in two: workers run ``__call__`` (decode to ``image_uint8`` only); the loop calls
    ``on_device(batch)`` on the device batch, which replaces ``image_uint8`` by ``view0``/``view1``, two
    independent ``BatchedAugment`` draws (view1 with ``second_config`` when given, BYOL's asymmetric views).
    ``pre_size`` (default ``size``): the side of the square the workers decode to."""

    def __init__(self, size: int, mean, std, config: AugmentConfig | None = None,
                 second_config: AugmentConfig | None = None, pre_size: int | None = None):
        self.first = BatchedAugment(size, mean, std, config)
        self.second = BatchedAugment(size, mean, std, second_config) if second_config else self.first
        self.decode = DecodedImage(pre_size or size)

    def __call__(self, image, sample=None) -> dict:
        return self.decode(image, sample)

    def on_device(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        batch = dict(batch)
        images = batch.pop("image_uint8")
        batch["view0"] = self.first(images, generator)
        batch["view1"] = self.second(images, generator)
        return batch


def device_views_from(recipe, pre_size: int | None = None) -> DeviceTwoViews:
    """The ``DeviceTwoViews`` equivalent of a ``trainer.data.views.TwoViews`` (its ``size``, ``mean``, ``std``,
    ``config`` and ``second_config``)."""
    missing = [name for name in ("size", "mean", "std", "config", "second_config") if not hasattr(recipe, name)]
    if missing:
        raise ValueError(f"{type(recipe).__name__} cannot run on the device: it lacks {', '.join(missing)} "
                         "(device augmentation supports TwoViews recipes)")
    return DeviceTwoViews(recipe.size, recipe.mean, recipe.std, recipe.config, recipe.second_config, pre_size)
