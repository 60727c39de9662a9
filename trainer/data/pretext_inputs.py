"""Inputs of the pretext-task objectives (rotation, jigsaw, context, exemplar), built as tensor operations.

Batched builders (used in ``forward`` on the whole batch, or in the data workers on one image as a batch of 1):
``rotate_batch`` (all four rotations, ``torch.rot90``), ``cut_tiles`` (a grid of tiles with gaps and random
jitter, one advanced-indexing gather), ``normalise_tiles`` (per-tile, per-channel mean/std), ``permute_tiles``
and ``inverse_permutation``, ``hamming_permutation_set`` (the jigsaw's fixed permutation set), ``sample_neighbours``
(context prediction's centre/neighbour pair), ``gradient_energy``/``choose_patch_corners`` (Exemplar-CNN's seed
patch from high-gradient regions) and ``exemplar_transforms`` (K random affine + colour transforms of a patch,
one ``grid_sample``). The view recipes at the end are the picklable per-image callables the data workers run.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from .views import OneView

NEIGHBOUR_POSITIONS = (0, 1, 2, 3, 5, 6, 7, 8)  # context label k -> grid cell (row-major 3x3); 4 is the centre
CENTRE_POSITION = 4


# ---------------------------------------------------------------- rotation (Gidaris et al. 2018)
def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C, S, S] -> ([4N, C, S, S], labels [4N]): every image at 0, 90, 180 and 270 degrees counter-clockwise
    (``torch.rot90`` over H, W), rotation-major: rows k*N .. k*N + N - 1 carry label k (k * 90 degrees)."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate_batch needs square [N, C, S, S] images, got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


# ---------------------------------------------------------------- tiles (jigsaw, context)
def cut_tiles(images: torch.Tensor, grid: int, tile: int, gap: int, jitter: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """[N, C, H, W] -> [N, grid*grid, C, tile, tile], row-major. The grid of tiles separated by ``gap`` px sits
    in the middle of the image; each tile moves by an independent random shift in [-jitter, jitter] px along
    each axis (clamped to the image), so neighbouring edges never line up (the papers' gap + jitter)."""
    n, _, height, width = images.shape
    extent = grid * tile + (grid - 1) * gap
    if tile < 1 or gap < 0 or jitter < 0 or extent > min(height, width):
        raise ValueError(f"cut_tiles: {grid}x{grid} tiles of {tile} px with gap {gap} span {extent} px, more than "
                         f"the {height}x{width} image (or a negative size)")
    nominal = torch.arange(grid) * (tile + gap)
    top = (height - extent) // 2 + nominal.repeat_interleave(grid)  # [T] row of each tile, row-major
    left = (width - extent) // 2 + nominal.repeat(grid)
    shift = torch.randint(-jitter, jitter + 1, (2, n, grid * grid), generator=generator)
    top = (top + shift[0]).clamp(0, height - tile).to(images.device)
    left = (left + shift[1]).clamp(0, width - tile).to(images.device)
    offsets = torch.arange(tile, device=images.device)
    rows = (top[..., None] + offsets)[:, :, :, None]  # [N, T, tile, 1]
    cols = (left[..., None] + offsets)[:, :, None, :]  # [N, T, 1, tile]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    return images[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # gathered as [N, T, tile, tile, C]


def normalise_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """[..., C, h, w] -> each tile's channels to zero mean and unit std on their own (Noroozi & Favaro: so that
    tiles cannot be matched by their low-level statistics)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True)
    return (tiles - mean) / (std + eps)


def permute_tiles(tiles: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """tiles [N, T, ...], permutations [N, T] -> [N, T, ...] with position i showing tile ``permutations[n, i]``."""
    index = permutations.reshape(*permutations.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return torch.gather(tiles, 1, index)


def inverse_permutation(permutations: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T]: q with q[p[i]] = i, so ``permute_tiles(permute_tiles(x, p), q) == x``."""
    return torch.argsort(permutations, dim=-1)


def hamming_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, T], [B, T] permutations -> [A, B]: the number of positions at which they differ."""
    return (a[:, None, :] != b[None, :, :]).sum(-1)


@functools.lru_cache(maxsize=2)
def _all_permutations(num_tiles: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(num_tiles))), dtype=torch.int8)


@functools.lru_cache(maxsize=8)
def _hamming_permutation_set(num_tiles: int, size: int, seed: int, selection: str, max_candidates: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if math.factorial(num_tiles) <= max_candidates:
        candidates = _all_permutations(num_tiles)  # 9! = 362,880: the paper's full set
    else:  # too many to list: a seeded sample of distinct random permutations
        candidates = torch.unique(torch.rand(max_candidates, num_tiles, generator=generator).argsort(1), dim=0).to(torch.int8)
    if not 2 <= size <= candidates.shape[0]:
        raise ValueError(f"permutation set size must be in [2, {candidates.shape[0]}] for {num_tiles} tiles, got {size}")
    first = int(torch.randint(candidates.shape[0], (1,), generator=generator))
    chosen = [first]
    distance = (candidates != candidates[first]).sum(1, dtype=torch.int32)
    score = distance.clone()  # "min": distance to the nearest chosen permutation; "sum": summed distance
    for _ in range(size - 1):
        masked = score.clone()
        masked[chosen] = -1
        best = (masked == masked.max()).nonzero().flatten()  # ties broken at random (seeded)
        pick = int(best[torch.randint(best.numel(), (1,), generator=generator)])
        chosen.append(pick)
        distance = (candidates != candidates[pick]).sum(1, dtype=torch.int32)
        score = torch.minimum(score, distance) if selection == "min" else score + distance
    return candidates[chosen].long()


def hamming_permutation_set(num_tiles: int, size: int, seed: int = 0, selection: str = "min",
                            max_candidates: int = 362_880) -> torch.Tensor:
    """[size, num_tiles] int64: Noroozi & Favaro's maximal-Hamming-distance permutation set, greedily.

    Start from a random permutation; then repeatedly add the candidate farthest from the chosen set: with
    ``selection="min"`` the one whose distance to its nearest chosen permutation is largest (max-min, which
    directly raises the set's minimal distance), with ``"sum"`` the one whose summed distance to the chosen set
    is largest (Algorithm 1 of the paper, D-bar = 1^T D). Candidates are all num_tiles! permutations when that
    is at most ``max_candidates`` (9! for 3x3), otherwise ``max_candidates`` seeded random ones. Deterministic
    in ``seed``."""
    if selection not in ("min", "sum"):
        raise ValueError(f"permutation selection must be 'min' or 'sum', got {selection!r}")
    if num_tiles < 2:
        raise ValueError(f"a permutation set needs at least 2 tiles, got {num_tiles}")
    return _hamming_permutation_set(num_tiles, size, seed, selection, max_candidates).clone()


def sample_neighbours(tiles: torch.Tensor, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tiles [N, 9, C, h, w] of a 3x3 grid -> (centre [N, C, h, w], neighbour [N, C, h, w], label [N]): one of
    the centre's 8 neighbours per image, uniformly; label k means grid cell ``NEIGHBOUR_POSITIONS[k]``
    (0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom, 7 bottom-right)."""
    if tiles.dim() != 5 or tiles.shape[1] != 9:
        raise ValueError(f"sample_neighbours needs a 3x3 grid of tiles [N, 9, C, h, w], got {tuple(tiles.shape)}")
    n = tiles.shape[0]
    labels = torch.randint(len(NEIGHBOUR_POSITIONS), (n,), generator=generator).to(tiles.device)
    cells = torch.tensor(NEIGHBOUR_POSITIONS, device=tiles.device)[labels]
    rows = torch.arange(n, device=tiles.device)
    return tiles[:, CENTRE_POSITION], tiles[rows, cells], labels


# ---------------------------------------------------------------- exemplar (Dosovitskiy et al. 2014)
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def gradient_energy(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> [N, H, W]: squared Sobel gradient magnitude of the luminance (borders replicated)."""
    luminance = images.mean(dim=1, keepdim=True) if images.shape[1] != 3 else (
        0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
    kernels = torch.stack([_SOBEL, _SOBEL.t()])[:, None].to(images)
    gradients = F.conv2d(F.pad(luminance, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.pow(2).sum(dim=1)


def choose_patch_corners(images: torch.Tensor, patch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[N, C, H, W] -> [N, 2] (top, left) of a ``patch`` px seed patch per image, drawn with probability
    proportional to the patch's mean squared gradient magnitude (Exemplar-CNN samples patches "from regions
    containing considerable gradients"); a flat image falls back to a uniform choice."""
    n, _, height, width = images.shape
    if not 0 < patch <= min(height, width):
        raise ValueError(f"seed patch of {patch} px does not fit a {height}x{width} image")
    scores = F.avg_pool2d(gradient_energy(images)[:, None], patch, stride=1)[:, 0]  # [N, H-p+1, W-p+1]
    columns = scores.shape[-1]
    weights = scores.flatten(1) + 1e-12  # all-zero rows stay valid (uniform)
    index = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return torch.stack([index // columns, index % columns], dim=1)


@dataclass
class ExemplarTransformConfig:
    """Exemplar-CNN's transformation family (the paper's ranges): translation, scale, rotation, contrast,
    colour; ``hue`` is the paper's "color" hue shift as a fraction of the circle."""

    translate: float = 0.2                   # shift up to this fraction of the patch side, each axis
    scale: tuple[float, float] = (0.7, 1.4)  # zoom factor of the sampled square
    rotate: float = 20.0                     # degrees, +-
    flip: float = 0.5                        # horizontal flip probability (not in the paper; cheap and harmless)
    brightness: float = 0.2                  # multiply by 1 +- this
    contrast: tuple[float, float] = (0.5, 2.0)    # scale of the deviation from the patch mean
    saturation: tuple[float, float] = (0.5, 2.0)  # scale of the deviation from the grey level
    hue: float = 0.1                         # rotate the chroma plane (YIQ) by up to +-hue * 360 degrees

    def __post_init__(self) -> None:
        for name in ("scale", "contrast", "saturation"):  # YAML gives lists
            low, high = (float(v) for v in getattr(self, name))
            setattr(self, name, (low, high))
            if not 0 < low <= high:
                raise ValueError(f"exemplar transform {name} needs 0 < low <= high, got {(low, high)}")


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def exemplar_transforms(image: torch.Tensor, corner: torch.Tensor, patch: int, out_size: int, copies: int,
                        config: ExemplarTransformConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """image [C, H, W] in [0, 1], corner (top, left) of the seed patch -> [copies, C, out_size, out_size] in
    [0, 1]: each copy resamples the image around the seed patch under its own random affine map (translation,
    zoom, rotation, flip; pixels come from the whole image, reflected at its border) in one batched
    ``grid_sample``, then gets its own brightness, contrast, saturation and hue change."""
    channels, height, width = image.shape
    k = copies
    # Affine map from output coordinates [-1, 1]^2 to input coordinates (align_corners=False convention).
    centre_x = (float(corner[1]) + patch / 2) / width * 2 - 1
    centre_y = (float(corner[0]) + patch / 2) / height * 2 - 1
    zoom = _uniform(*config.scale, k, generator)
    angle = _uniform(-config.rotate, config.rotate, k, generator) * math.pi / 180
    mirror = torch.where(torch.rand(k, generator=generator) < config.flip, -1.0, 1.0)
    shift_x = _uniform(-config.translate, config.translate, k, generator) * patch / width * 2
    shift_y = _uniform(-config.translate, config.translate, k, generator) * patch / height * 2
    half_x, half_y = zoom * patch / width, zoom * patch / height
    theta = torch.zeros(k, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = half_x * angle.cos() * mirror, -half_x * angle.sin()
    theta[:, 1, 0], theta[:, 1, 1] = half_y * angle.sin() * mirror, half_y * angle.cos()
    theta[:, 0, 2], theta[:, 1, 2] = centre_x + shift_x, centre_y + shift_y
    grid = F.affine_grid(theta.to(image), [k, channels, out_size, out_size], align_corners=False)
    copies_ = F.grid_sample(image.expand(k, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)
    copies_ = copies_ * _uniform(1 - config.brightness, 1 + config.brightness, k, generator).view(k, 1, 1, 1)
    mean = copies_.mean(dim=(1, 2, 3), keepdim=True)
    copies_ = mean + (copies_ - mean) * _uniform(*config.contrast, k, generator).view(k, 1, 1, 1)
    if channels == 3:
        grey = (0.299 * copies_[:, 0:1] + 0.587 * copies_[:, 1:2] + 0.114 * copies_[:, 2:3])
        copies_ = grey + (copies_ - grey) * _uniform(*config.saturation, k, generator).view(k, 1, 1, 1)
        turn = _uniform(-config.hue, config.hue, k, generator) * 2 * math.pi  # rotate (I, Q) around the Y axis
        rotation = torch.zeros(k, 3, 3)
        rotation[:, 0, 0] = 1
        rotation[:, 1, 1], rotation[:, 1, 2] = turn.cos(), -turn.sin()
        rotation[:, 2, 1], rotation[:, 2, 2] = turn.sin(), turn.cos()
        matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ  # [K, 3, 3] acting on RGB
        copies_ = torch.einsum("kij,kjhw->kihw", matrix.to(copies_), copies_)
    return copies_.clamp(0, 1)


# ---------------------------------------------------------------- view recipes (data workers)
# RotationView: one lightly augmented view {"image": [C, S, S]}; ``rotate_batch`` turns the batch into its four
# rotations in ``forward`` (all rotations of an image in the same batch, as Gidaris et al.).
RotationView = OneView


def _mean_std(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


class TileGridView:
    """``(image, sample) -> {"tiles": [grid*grid, C, tile, tile]}`` in grid order (jigsaw): a random crop
    rescaled to ``puzzle_size``, cut into tiles with gap and jitter, each tile normalised on its own (or with the
    dataset mean/std when ``per_tile_normalisation`` is False). The shuffling happens on the batch in
    ``forward``, against the objective's permutation set."""

    def __init__(self, puzzle_size: int, grid: int, tile: int, gap: int, jitter: int, mean, std,
                 crop_scale=(0.6, 1.0), grayscale_prob: float = 0.0, per_tile_normalisation: bool = True):
        cut_tiles(torch.zeros(1, 1, puzzle_size, puzzle_size), grid, tile, gap, jitter)  # geometry check, early
        steps: list = [T.RandomResizedCrop(puzzle_size, scale=tuple(crop_scale), ratio=(1.0, 1.0), antialias=True)]
        if grayscale_prob > 0:
            steps.append(T.RandomGrayscale(grayscale_prob))
        self.transform = T.Compose(steps + [T.ToTensor()])
        self.grid, self.tile, self.gap, self.jitter = grid, tile, gap, jitter
        self.mean, self.std = _mean_std(mean, std)
        self.per_tile_normalisation = per_tile_normalisation

    def __call__(self, image, sample) -> dict:
        tiles = cut_tiles(self.transform(image)[None], self.grid, self.tile, self.gap, self.jitter)[0]
        tiles = normalise_tiles(tiles) if self.per_tile_normalisation else (tiles - self.mean) / self.std
        return {"tiles": tiles.contiguous()}


class ContextPairView:
    """``(image, sample) -> {"centre", "neighbour": [C, tile, tile], "position": label in 0..7}`` (context
    prediction): a random crop rescaled to ``puzzle_size``, the 3x3 grid of tiles with gap and jitter, the
    centre and one random neighbour, dataset-normalised; with ``colour_drop`` each patch keeps only one random
    colour channel with that probability (Doersch et al.'s remedy for chromatic-aberration shortcuts)."""

    def __init__(self, puzzle_size: int, tile: int, gap: int, jitter: int, mean, std,
                 crop_scale=(0.6, 1.0), colour_drop: float = 0.0):
        cut_tiles(torch.zeros(1, 1, puzzle_size, puzzle_size), 3, tile, gap, jitter)
        self.transform = T.Compose([T.RandomResizedCrop(puzzle_size, scale=tuple(crop_scale), ratio=(1.0, 1.0),
                                                        antialias=True), T.ToTensor()])
        self.tile, self.gap, self.jitter = tile, gap, jitter
        self.mean, self.std = _mean_std(mean, std)
        self.colour_drop = colour_drop

    def __call__(self, image, sample) -> dict:
        from .patches import drop_colours

        tiles = cut_tiles(self.transform(image)[None], 3, self.tile, self.gap, self.jitter)
        centre, neighbour, label = sample_neighbours(tiles)
        pair = (torch.cat([centre, neighbour]) - self.mean) / self.std
        if self.colour_drop > 0:
            pair = drop_colours(pair, self.colour_drop)
        return {"centre": pair[0].contiguous(), "neighbour": pair[1].contiguous(), "position": int(label[0])}


class ExemplarView:
    """``(image, sample) -> {"patches": [copies, C, out_size, out_size]}`` (Exemplar-CNN): the sample's seed
    patch, chosen once per sample id from its gradient energy (a generator seeded by ``seed`` and the id, so
    every epoch sees the same seed patch: one surrogate class per patch), and ``copies`` random transforms of
    it, drawn anew every time."""

    def __init__(self, image_size: int, patch: int, out_size: int, copies: int, mean, std,
                 config: ExemplarTransformConfig, seed: int = 0):
        if copies < 1:
            raise ValueError(f"exemplar needs at least one transformed copy per patch, got {copies}")
        self.to_tensor = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToTensor()])
        self.patch, self.out_size, self.copies, self.config, self.seed = patch, out_size, copies, config, seed
        self.mean, self.std = _mean_std(mean, std)

    def seed_corner(self, image: torch.Tensor, sample_id: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + int(sample_id)) % (2 ** 63))
        return choose_patch_corners(image[None], self.patch, generator)[0]

    def __call__(self, image, sample) -> dict:
        pixels = self.to_tensor(image)
        corner = self.seed_corner(pixels, sample.sample_id)
        copies = exemplar_transforms(pixels, corner, self.patch, self.out_size, self.copies, self.config)
        return {"patches": ((copies - self.mean) / self.std).contiguous()}
