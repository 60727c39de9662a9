"""Batched device augmentation (``trainer.data.batched_augment``) against torchvision's per-image recipe.

Statistical equivalence (two-sample Kolmogorov-Smirnov statistics against torchvision's own draws, at a fixed
alpha = 0.001 threshold; all draws seeded, so the tests are deterministic), exactness where randomness is off or
the parameters are given, per-channel statistics on real CIFAR-10 images, seeding, the worker/device split, CUDA."""
import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from trainer.data.batched_augment import (
    BRIGHTNESS, CONTRAST, HUE, SATURATION, AugmentParams, BatchedAugment, DecodedImage, DeviceTwoViews,
    blur_kernel_size, crop_boxes, device_views_from, gaussian_blur,
)
from trainer.data.views import AugmentConfig, TwoViews, augmentation

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
OFF = dict(crop_scale=(1.0, 1.0), flip=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
KS_C_ALPHA = 1.949  # c(alpha) of the KS test at alpha = 0.001


def ks_two_sample(a, b) -> tuple[float, float]:
    """(D, threshold): the two-sample KS statistic and its alpha = 0.001 critical value."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    points = np.concatenate([a, b])
    d = np.max(np.abs(np.searchsorted(a, points, "right") / len(a) - np.searchsorted(b, points, "right") / len(b)))
    return float(d), KS_C_ALPHA * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def test_ks_statistic_separates_uniform_from_log_uniform_ratios():
    """The statistic has the power the crop tests rely on: uniform vs log-uniform aspect ratios at n = 20000."""
    rng = np.random.default_rng(0)
    log_uniform = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), 20000))
    d_same, threshold = ks_two_sample(log_uniform, np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), 20000)))
    d_other, _ = ks_two_sample(log_uniform, rng.uniform(3 / 4, 4 / 3, 20000))
    assert d_same < threshold < d_other


def _torchvision_boxes(n: int, height: int, width: int, scale, ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    torch.manual_seed(1)
    image = torch.empty(3, height, width)
    return np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)], dtype=np.float64)


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.2, 1.0)), (40, 64, (0.08, 1.0))])
def test_crop_boxes_match_torchvision_get_params(height, width, scale):
    n = 20000
    ours = crop_boxes(n, height, width, scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(0)).numpy()
    theirs = _torchvision_boxes(n, height, width, scale)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
    for name, fn in [("area fraction", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                     ("aspect ratio", lambda b: b[:, 3] / b[:, 2]),
                     ("relative top", lambda b: (b[:, 0] + 0.5) / (height - b[:, 2] + 1)),
                     ("relative left", lambda b: (b[:, 1] + 0.5) / (width - b[:, 3] + 1))]:
        d, threshold = ks_two_sample(fn(ours), fn(theirs))
        assert d < threshold, f"{name}: KS D = {d:.4f} >= {threshold:.4f}"
    fallback = lambda b: np.mean((b[:, 2] == height) & (b[:, 3] == min(width, round(height * 4 / 3))))
    assert abs(fallback(ours) - fallback(theirs)) < 0.01  # the centre-crop fallback as often


def test_full_scale_crop_is_the_whole_square_image_for_any_ratio():
    boxes = crop_boxes(500, 32, 32, (1.0, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(500, 4).double())


def _constant_images(n: int, rgb, side: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, side, side).contiguous()


def _unnormalise(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def _per_image(config: AugmentConfig, image: Image.Image, n: int, size: int = 8, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    transform = augmentation(size, MEAN, STD, config)
    return _unnormalise(torch.stack([transform(image) for _ in range(n)]))


def test_flip_rate():
    n = 4000
    images = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(1, 3, 8, 8).expand(n, 3, 8, 8).contiguous()
    out = _unnormalise(BatchedAugment(8, MEAN, STD, AugmentConfig(**{**OFF, "flip": 0.3}))(images, torch.Generator().manual_seed(0)))
    plain, mirrored = images.float() / 255, images.float().flip(-1) / 255
    is_plain = (out - plain).abs().amax(dim=(1, 2, 3)) < 1e-5
    is_mirrored = (out - mirrored).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert torch.all(is_plain ^ is_mirrored)
    assert abs(is_mirrored.float().mean().item() - 0.3) < 0.03


def test_jitter_rate_and_brightness_factor_distribution_match_torchvision():
    """On a constant grey image contrast, saturation and hue do nothing: the output is grey * brightness factor."""
    n, grey = 4000, 102
    config = AugmentConfig(**{**OFF, "jitter_prob": 0.8, "jitter_strength": 0.5})
    ours = _unnormalise(BatchedAugment(8, MEAN, STD, config)(_constant_images(n, (grey,) * 3), torch.Generator().manual_seed(0)))
    theirs = _per_image(config, Image.new("RGB", (8, 8), (grey,) * 3), n)
    for out in (ours, theirs):
        assert (out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))).max() < 2e-3  # still constant
    factor_ours = ours[:, 0, 0, 0].numpy() * 255 / grey
    factor_theirs = theirs[:, 0, 0, 0].numpy() * 255 / grey
    jittered_ours = np.abs(factor_ours - 1) > 1.5 / grey  # PIL's uint8 rounding hides factors within 1/grey of 1
    jittered_theirs = np.abs(factor_theirs - 1) > 1.5 / grey
    expected = 0.8 * (1 - 3 / grey / 0.8)  # minus the factors too close to 1 to see
    assert abs(jittered_ours.mean() - expected) < 0.03 and abs(jittered_theirs.mean() - expected) < 0.03
    d, threshold = ks_two_sample(factor_ours[jittered_ours], factor_theirs[jittered_theirs])
    assert d < threshold, f"brightness factor: KS D = {d:.4f} >= {threshold:.4f}"
    assert 0.59 < factor_ours[jittered_ours].min() < 0.62 and 1.38 < factor_ours[jittered_ours].max() < 1.41


def test_jitter_order_is_a_uniform_random_permutation_per_sample():
    params = BatchedAugment(8, MEAN, STD).sample_params(24000, 8, 8, torch.Generator().manual_seed(0))
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(24000, 4))
    codes = (params.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0]
    assert len(counts) == 24 and counts.min() > 850 and counts.max() < 1150  # 1000 expected, sd ~31


def test_grayscale_rate_matches_torchvision():
    n, colour = 4000, (200, 50, 100)
    config = AugmentConfig(**{**OFF, "grayscale_prob": 0.2})
    ours = _unnormalise(BatchedAugment(8, MEAN, STD, config)(_constant_images(n, colour), torch.Generator().manual_seed(0)))
    theirs = _per_image(config, Image.new("RGB", (8, 8), colour), n)
    rates = []
    for out in (ours, theirs):
        grey = (out.amax(dim=1) - out.amin(dim=1)).amax(dim=(1, 2)) < 2e-3
        rates.append(grey.float().mean().item())
        luma = 0.2989 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        assert torch.allclose(out[grey] * 255, torch.full_like(out[grey], luma), atol=0.6)
    assert abs(rates[0] - 0.2) < 0.03 and abs(rates[1] - 0.2) < 0.03


def test_solarize_rate_matches_torchvision_and_uses_threshold_128():
    n = 4000
    config = AugmentConfig(**{**OFF, "solarize_prob": 0.3})
    augment = BatchedAugment(8, MEAN, STD, config)
    ours = _unnormalise(augment(_constant_images(n, (200, 128, 127)), torch.Generator().manual_seed(0))) * 255
    theirs = _per_image(config, Image.new("RGB", (8, 8), (200, 128, 127)), n) * 255
    for out in (ours, theirs):
        solarized = (out[:, 0, 0, 0] - 55).abs() < 0.01
        assert torch.all(solarized | ((out[:, 0, 0, 0] - 200).abs() < 0.01))
        assert torch.all(((out[:, 1] - 127).abs() < 0.01)[solarized]) and torch.all((out[:, 2] - 127).abs() < 0.01)
        assert abs(solarized.float().mean().item() - 0.3) < 0.03


def test_blur_rate_sigma_range_and_kernel():
    n, size = 4000, 32
    config = AugmentConfig(**{**OFF, "blur_prob": 0.5})
    augment = BatchedAugment(size, (0.0,) * 3, (1.0,) * 3, config)
    params = augment.sample_params(n, size, size, torch.Generator().manual_seed(0))
    sigma = params.sigma.numpy()
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0
    d, threshold = ks_two_sample(sigma, np.random.default_rng(0).uniform(0.1, 2.0, n))
    assert d < threshold
    impulse = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    impulse[:, :, 16, 16] = 255
    out = augment.apply(impulse, params)
    blurred = out[:, 0, 16, 16] < 1 - 1e-6
    assert not blurred[~params.blur].any()
    assert blurred[params.blur & (params.sigma > 0.2)].all()  # below ~0.18 the 3-tap kernel is [0, 1, 0] in float32
    assert abs(params.blur.float().mean().item() - 0.5) < 0.03
    k = blur_kernel_size(size)
    taps = torch.exp(-0.5 * (torch.arange(k) - k // 2).double()[None, :] ** 2 / params.sigma.double()[:, None] ** 2)
    taps = taps / taps.sum(dim=1, keepdim=True)
    expected = torch.einsum("ni,nj->nij", taps, taps).float()
    window = out[:, 0, 16 - k // 2:16 + k // 2 + 1, 16 - k // 2:16 + k // 2 + 1]
    assert torch.allclose(window[params.blur], expected[params.blur], atol=1e-5)


def test_blur_op_equals_torchvision_gaussian_blur_per_sample():
    x = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.6, 1.0, 1.7, 2.0])
    for k in (3, 23):
        expected = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(5)])
        assert torch.allclose(gaussian_blur(x, sigma, k), expected, atol=1e-5)


def _reference(images: torch.Tensor, params: AugmentParams, size: int, mean, std) -> torch.Tensor:
    """The per-image pipeline on float tensors with torchvision's functional ops and the given parameters."""
    ops = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}
    outputs = []
    for i in range(images.shape[0]):
        top, left, h, w = (int(v) for v in params.boxes[i])
        x = TF.resized_crop(images[i].float() / 255, top, left, h, w, [size, size], antialias=True)
        if params.flip[i]:
            x = TF.hflip(x)
        if params.jitter[i]:
            for op in params.order[i].tolist():
                x = ops[op](x, float(params.factors[i, op]))
        if params.gray[i] and x.shape[0] == 3:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params.blur[i]:
            k = blur_kernel_size(size)
            x = TF.gaussian_blur(x, [k, k], [float(params.sigma[i])] * 2)
        if params.solarize[i]:
            x = TF.solarize(x, 127.5 / 255)
        outputs.append(TF.normalize(x, mean, std))
    return torch.stack(outputs)


@pytest.mark.parametrize("channels", [3, 1])
def test_given_parameters_equal_torchvision_functional_ops(channels):
    """Every step on: the batched pipeline equals torchvision's tensor ops applied image by image, in each image's
    own jitter order (crops no larger than the output: bilinear upsampling, where antialiasing does nothing)."""
    n, size = 48, 56  # blur kernel 5
    config = AugmentConfig(crop_scale=(0.2, 1.0), flip=0.5, jitter_prob=0.8, grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3)
    mean, std = (0.0,) * channels, (1.0,) * channels  # compared in [0, 1] pixel units
    augment = BatchedAugment(size, mean, std, config)
    images = torch.randint(0, 256, (n, channels, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    params = augment.sample_params(n, 32, 32, torch.Generator().manual_seed(4))
    assert (params.boxes[:, 2:] <= size).all()
    out = augment.apply(images, params)
    assert out.dtype == torch.float32 and out.shape == (n, channels, size, size)
    assert (out - _reference(images, params, size, mean, std)).abs().max() < 1e-5


def _cifar_images(limit: int) -> list[Image.Image]:
    if not CIFAR_DIR.exists():
        pytest.skip(CIFAR_SKIP_REASON)
    images = []
    with tarfile.open(CIFAR_DIR / "train-000000.tar.gz") as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                images.append(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
                if len(images) == limit:
                    break
    return images


def test_without_randomness_equals_the_per_image_recipe_on_cifar():
    images = _cifar_images(64)
    batch = torch.stack([TF.pil_to_tensor(image) for image in images])
    expected = torch.stack([augmentation(32, MEAN, STD, AugmentConfig(**OFF))(image) for image in images])
    for ratio in [(1.0, 1.0), (3 / 4, 4 / 3)]:
        out = BatchedAugment(32, MEAN, STD, AugmentConfig(**OFF), ratio=ratio)(batch, torch.Generator().manual_seed(0))
        assert (out - expected).abs().max() < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"blur_prob": 0.5, "solarize_prob": 0.2, "crop_scale": (0.08, 1.0)}])
def test_per_channel_statistics_match_the_per_image_recipe_on_cifar(overrides):
    images = _cifar_images(2000)
    config = AugmentConfig(**overrides)
    torch.manual_seed(0)
    transform = augmentation(32, MEAN, STD, config)
    theirs = torch.stack([transform(image) for image in images])
    batch = torch.stack([TF.pil_to_tensor(image) for image in images])
    ours = BatchedAugment(32, MEAN, STD, config)(batch, torch.Generator().manual_seed(0))
    assert ours.shape == theirs.shape == (2000, 3, 32, 32)
    per_image_ours, per_image_theirs = ours.mean(dim=(2, 3)), theirs.mean(dim=(2, 3))
    assert torch.allclose(per_image_ours.mean(dim=0), per_image_theirs.mean(dim=0), atol=0.05)
    assert torch.allclose(ours.std(dim=(0, 2, 3)), theirs.std(dim=(0, 2, 3)), rtol=0.04)
    assert torch.allclose(per_image_ours.std(dim=0), per_image_theirs.std(dim=0), rtol=0.06)


def test_output_shape_dtype_and_normalisation():
    images = torch.randint(0, 256, (6, 3, 20, 28), dtype=torch.uint8)
    out = BatchedAugment(16, MEAN, STD)(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (6, 3, 16, 16)
    raw = BatchedAugment(16, (0.0,) * 3, (1.0,) * 3)(images, torch.Generator().manual_seed(0))
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(out, (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), atol=1e-5)
    grey = BatchedAugment(16, (0.5,), (0.25,))(images[:, :1], torch.Generator().manual_seed(0))
    assert grey.shape == (6, 1, 16, 16) and torch.isfinite(grey).all()


def test_bad_options_and_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="crop_scale"):
        BatchedAugment(16, MEAN, STD, AugmentConfig(crop_scale=(0.0, 1.0)))
    with pytest.raises(ValueError, match="jitter_prob"):
        BatchedAugment(16, MEAN, STD, AugmentConfig(jitter_prob=1.5))
    with pytest.raises(ValueError, match="channels"):
        BatchedAugment(16, MEAN, STD)(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pre_size"):
        DecodedImage(0)


def test_generator_seeding_makes_outputs_reproducible():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    augment = BatchedAugment(32, MEAN, STD, AugmentConfig(blur_prob=0.5, solarize_prob=0.2))
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_decoded_image_resizes_the_shorter_side_and_centre_crops():
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = DecodedImage(32)(square, None)["image_uint8"]
    assert out.dtype == torch.uint8 and torch.equal(out, TF.pil_to_tensor(square))  # CIFAR: nothing to do
    wide = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = DecodedImage(32)(wide, None)["image_uint8"]
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, TF.pil_to_tensor(TF.center_crop(wide.resize((42, 32), Image.BILINEAR), [32, 32])))


def test_device_two_views_splits_decoding_from_augmentation():
    first = AugmentConfig(solarize_prob=0.0)
    second = AugmentConfig(**{**OFF, "solarize_prob": 1.0})
    recipe = pickle.loads(pickle.dumps(DeviceTwoViews(32, MEAN, STD, first, second)))  # workers get a pickled copy
    images = _cifar_images(8) if CIFAR_DIR.exists() else [Image.new("RGB", (32, 32), (200, 10, 90))] * 8
    samples = [recipe(image, None) for image in images]
    assert list(samples[0]) == ["image_uint8"]
    batch = {"image_uint8": torch.stack([s["image_uint8"] for s in samples]), "label": torch.arange(8)}
    out = recipe.on_device(batch, torch.Generator().manual_seed(0))
    assert set(out) == {"view0", "view1", "label"} and torch.equal(out["label"], torch.arange(8))
    assert out["view0"].shape == out["view1"].shape == (8, 3, 32, 32) and not torch.allclose(out["view0"], out["view1"])
    solarized = torch.where(batch["image_uint8"] >= 128, 255 - batch["image_uint8"], batch["image_uint8"])
    assert torch.allclose(_unnormalise(out["view1"]), solarized.float() / 255, atol=1e-5)  # view1: its own recipe
    same = DeviceTwoViews(32, MEAN, STD, first).on_device(batch, torch.Generator().manual_seed(0))
    assert same["view0"].shape == (8, 3, 32, 32) and not torch.allclose(same["view0"], same["view1"])


def test_device_views_from_two_views():
    first, second = AugmentConfig(blur_prob=1.0), AugmentConfig(solarize_prob=0.2)
    recipe = TwoViews(32, MEAN, STD, first, second)
    recipe.size, recipe.mean, recipe.std, recipe.config, recipe.second_config = 32, MEAN, STD, first, second
    views = device_views_from(recipe)
    assert views.first.config is first and views.second.config is second and views.first.size == 32
    assert views.first.mean == MEAN and views.decode.pre_size == 32
    assert device_views_from(recipe, pre_size=40).decode.pre_size == 40
    with pytest.raises(ValueError, match="lacks"):
        device_views_from(object())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_with_the_same_parameters_and_seeds_on_device():
    config = AugmentConfig(blur_prob=0.5, solarize_prob=0.2)
    augment = BatchedAugment(32, MEAN, STD, config)
    images = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = augment.sample_params(64, 40, 40, torch.Generator().manual_seed(1))
    on_gpu = augment.apply(images.cuda(), params)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    assert (on_gpu.cpu() - augment.apply(images, params)).abs().max() < 1e-4
    a = augment(images.cuda(), torch.Generator(device="cuda").manual_seed(3))
    b = augment(images.cuda(), torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(a, b)
    out = DeviceTwoViews(32, MEAN, STD, config).on_device({"image_uint8": images.cuda()})
    assert out["view0"].device.type == "cuda" and out["view1"].shape == (64, 3, 32, 32)
