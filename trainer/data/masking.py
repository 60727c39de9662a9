"""Patch masks for ViT objectives: which patch tokens of a view the encoder keeps.

A mask is given as the indices of the KEPT patches, raster order (row-major over the patch grid, index
``row * grid_width + column``), an int64 tensor ``trainer.models.vit.forward_vit`` takes as ``keep``: the
encoder embeds every patch, then drops the others before the transformer blocks (masking by dropping
tokens, MSN sec. 3 and MAE sec. 3). Every generator is a pure function of the grid, its size parameters and
a ``torch.Generator`` (None: torch's global generator, which the data loader seeds per worker), and keeps a
fixed number of patches, so masks of many samples stack into a batch.

* ``random_keep``: a uniformly random subset, ``mask_ratio`` of the patches dropped (MSN's random masking,
  MAE's masking).
* ``block_keep``: one random contiguous ``height x width`` block of the grid kept, the rest dropped (MSN's
  focal masking).
* ``dropped_indices``: the complement of a ``keep`` (the masked patches a reconstruction loss scores).
* ``WithKeepIndices``: a view-recipe wrapper that draws a mask per sample in the data workers and adds it to
  the sample as ``keep/<view>`` (or ``<key_prefix>/<view>``: any tensor a draw returns, e.g. a boolean mask).
* ``random_prefix_length`` / ``prefix_causal_attention_mask``: AIM's prefix length S ~ U{1, ..., L-1} (drawn
  per sample in the workers) and the boolean prefix-causal attention mask it defines (``forward_vit``'s
  ``attn_mask``): prefix tokens and the first S patches attend bidirectionally, every later patch causally.
* ``coarse_random_mask``: SimMIM's random masking of mask patches larger than the ViT patch (a boolean mask,
  True = masked, for ``forward_vit``'s ``mask``), ``coarse_masked_count`` of the cells masked.
* ``blockwise_mask``: BEiT's block-wise masking as iBOT and DINOv2 draw it (a boolean mask, True = masked): with
  a probability, a ratio drawn from a range, filled with random rectangles of bounded area and aspect ratio.
* ``multi_block_masks`` / ``inverse_block_keep``: I-JEPA's context block minus 4 target blocks (fixed target area
  ``multi_block_target_shapes``, fixed context count ``multi_block_context_count``), and CAPI's inverse block
  masking (the visible patches are one block, cyclically rolled).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _grid(grid: tuple[int, int] | int) -> tuple[int, int]:
    rows, columns = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows < 1 or columns < 1:
        raise ValueError(f"a patch grid needs at least one row and column, got {rows} x {columns}")
    return rows, columns


def kept_count(grid: tuple[int, int] | int, mask_ratio: float) -> int:
    """Patches ``random_keep`` keeps: floor(L * (1 - mask_ratio)) of the L patches (the authors' rule), at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    rows, columns = _grid(grid)
    return max(1, int(rows * columns * (1.0 - mask_ratio)))


def random_keep(grid: tuple[int, int] | int, mask_ratio: float, generator: torch.Generator | None = None,
                count: int | None = None) -> torch.Tensor:
    """A uniformly random set of ``kept_count(grid, mask_ratio)`` patches, sorted ascending.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        mask_ratio: fraction of the patches dropped, in [0, 1) (MSN: 0.15 for ViT-S/16, 0.3 for ViT-B/16).
        generator: the random source; None for torch's global one.
        count: None for one mask [K]; else ``count`` independent masks [count, K].
    Returns:
        int64 [K] or [count, K] patch indices.
    """
    rows, columns = _grid(grid)
    keep = kept_count((rows, columns), mask_ratio)
    draws = 1 if count is None else count
    masks = torch.stack([torch.randperm(rows * columns, generator=generator)[:keep].sort().values
                         for _ in range(draws)])
    return masks[0] if count is None else masks


def block_keep(grid: tuple[int, int] | int, block: tuple[int, int] | int, generator: torch.Generator | None = None,
               count: int | None = None) -> torch.Tensor:
    """One contiguous ``block`` of patches at a uniformly random position in the grid, raster order.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        block: (height, width) of the kept block in patches, or one int for a square block; at most the grid.
        generator: the random source; None for torch's global one.
        count: None for one mask [K]; else ``count`` independent masks [count, K].
    Returns:
        int64 [K] or [count, K] patch indices, K = height * width.
    """
    rows, columns = _grid(grid)
    height, width = _grid(block)
    if height > rows or width > columns:
        raise ValueError(f"a {height} x {width} block does not fit a {rows} x {columns} patch grid")
    draws = 1 if count is None else count
    tops = torch.randint(0, rows - height + 1, (draws,), generator=generator)
    lefts = torch.randint(0, columns - width + 1, (draws,), generator=generator)
    block_rows = torch.arange(height).view(1, height, 1) + tops.view(draws, 1, 1)
    block_columns = torch.arange(width).view(1, 1, width) + lefts.view(draws, 1, 1)
    masks = (block_rows * columns + block_columns).reshape(draws, height * width)
    return masks[0] if count is None else masks


def dropped_indices(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The patches a ``keep`` [K] or [N, K] leaves out, ascending: [L - K] or [N, L - K] (equal K per row)."""
    rows = keep.reshape(-1, keep.shape[-1])
    dropped = torch.ones(rows.shape[0], num_patches, dtype=torch.bool, device=keep.device)
    dropped.scatter_(1, rows, False)
    out = torch.stack([row.nonzero().flatten() for row in dropped])
    return out[0] if keep.dim() == 1 else out


class WithKeepIndices:
    """Picklable view recipe: the views of ``recipe`` plus, for each view named in ``masks``, the kept patch
    indices of that view drawn by ``masks[view]()`` (e.g. ``functools.partial(random_keep, (8, 8), 0.15)``),
    under the key ``keep/<view>``. Drawn in the data workers (seeded per worker and rank), so no two samples or
    processes share a mask and the training step draws no random numbers for masking."""

    def __init__(self, recipe, masks: dict[str, Callable[[], torch.Tensor]], key_prefix: str = "keep"):
        self.recipe = recipe
        self.masks = dict(masks)
        self.key_prefix = key_prefix

    def __call__(self, image, sample) -> dict:
        views = self.recipe(image, sample)
        missing = sorted(set(self.masks) - set(views))
        if missing:
            raise KeyError(f"masks for views {missing} that the recipe does not make (it makes {sorted(views)})")
        views.update({f"{self.key_prefix}/{view}": draw() for view, draw in self.masks.items()})
        return views


def random_prefix_length(num_patches: int, generator: torch.Generator | None = None,
                         count: int | None = None) -> torch.Tensor:
    """AIM's prefix length (El-Nouby et al. 2024, sec. 3): S uniform in {1, ..., L - 1}, so the prefix is never
    empty and at least one patch is left to predict.

    Args:
        num_patches: L, the patches of the raster-order sequence (>= 2).
        generator: the random source; None for torch's global one.
        count: None for one length (an int64 scalar, which collates to [N]); else ``count`` lengths [count].
    Returns:
        int64 [] or [count].
    """
    if num_patches < 2:
        raise ValueError(f"a prefix length in [1, L - 1] needs L >= 2 patches, got {num_patches}")
    lengths = torch.randint(1, num_patches, (1 if count is None else count,), generator=generator)
    return lengths[0] if count is None else lengths


def prefix_causal_attention_mask(num_patches: int, prefix_lengths: int | torch.Tensor,
                                 num_prefix_tokens: int = 1) -> torch.Tensor:
    """The boolean prefix-causal attention mask (True = may attend) over P prefix tokens (class, registers) then
    L raster-order patches, T = P + L tokens (AIM sec. 3, PrefixLM).

    Query t may attend key u when u <= t (causal) or u < P + S (u is in the prefix). So the prefix tokens and
    the first S patches attend bidirectionally among themselves and to nothing later; every later patch attends
    to the whole prefix and causally to the patches up to itself. The class / register tokens belong to the
    prefix: they carry only prefix information to later patches (no leak), and with S = L (the exported model's
    full attention) the mask is all True, so training with a prefix matches the bidirectional model the
    features are read from. S = 0 is plain causal attention over the patches.

    Args:
        num_patches: L.
        prefix_lengths: S in [0, L]: one int (or 0-d tensor) for the batch, or an int tensor [N], one per image.
        num_prefix_tokens: P, the tokens before the patches (``vit.num_prefix_tokens``).
    Returns:
        bool [T, T] for one S, [N, 1, T, T] for per-image S (broadcast over the attention heads), on the device
        of ``prefix_lengths``.
    """
    if num_patches < 1 or num_prefix_tokens < 0:
        raise ValueError(f"need num_patches >= 1 and num_prefix_tokens >= 0, got {num_patches}, {num_prefix_tokens}")
    lengths = torch.as_tensor(prefix_lengths)
    if lengths.dim() > 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"prefix_lengths must be an int or an int tensor [N], got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if lengths.numel() and (lengths.min() < 0 or lengths.max() > num_patches):
        raise ValueError(f"prefix lengths must be in [0, {num_patches}], got {lengths.tolist()}")
    total = num_prefix_tokens + num_patches
    position = torch.arange(total, device=lengths.device)
    causal = position.view(1, total, 1) >= position.view(1, 1, total)  # [1, T(query), T(key)]
    in_prefix = position.view(1, 1, total) < (num_prefix_tokens + lengths.reshape(-1, 1, 1))  # [N, 1, T(key)]
    mask = causal | in_prefix
    return mask[0] if lengths.dim() == 0 else mask.unsqueeze(1)


def coarse_masked_count(grid: tuple[int, int] | int, cell: tuple[int, int] | int, mask_ratio: float) -> int:
    """Cells ``coarse_random_mask`` masks: ceil(C * mask_ratio) of the C cells (SimMIM's ``MaskGenerator``)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    rows, columns = _grid(grid)
    height, width = _grid(cell)
    if rows % height or columns % width:
        raise ValueError(f"{height} x {width} mask cells do not tile a {rows} x {columns} patch grid")
    cells = (rows // height) * (columns // width)
    # Rounded first: 10 * 0.3 is 3.0000000000000004 in floating point, whose ceiling would be 4, not 3.
    return max(1, int(-(-round(cells * mask_ratio, 9) // 1)))


def coarse_random_mask(grid: tuple[int, int] | int, cell: tuple[int, int] | int, mask_ratio: float,
                       generator: torch.Generator | None = None, count: int | None = None) -> torch.Tensor:
    """SimMIM's random masking: the patch grid is tiled by ``cell``-sized mask patches (SimMIM's 32 px mask patch
    is 2 x 2 ViT-B/16 patches at 224 px), ``coarse_masked_count`` of them drawn uniformly without replacement,
    and every patch of a drawn cell is masked. A fixed number of patches is masked, so masks stack into a batch.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        cell: (height, width) of a mask patch in patches, or one int for a square cell; it must tile the grid.
        mask_ratio: fraction of the cells masked, in (0, 1) (SimMIM 0.6).
        generator: the random source; None for torch's global one.
        count: None for one mask [L]; else ``count`` independent masks [count, L].
    Returns:
        bool [L] or [count, L] over the raster-order patches, True = masked (``forward_vit``'s ``mask``).
    """
    rows, columns = _grid(grid)
    height, width = _grid(cell)
    masked = coarse_masked_count((rows, columns), (height, width), mask_ratio)
    cell_rows, cell_columns = rows // height, columns // width
    draws = 1 if count is None else count
    cells = torch.zeros(draws, cell_rows * cell_columns, dtype=torch.bool)
    for row in cells:
        row[torch.randperm(cell_rows * cell_columns, generator=generator)[:masked]] = True
    patches = (cells.view(draws, cell_rows, 1, cell_columns, 1)
               .expand(draws, cell_rows, height, cell_columns, width).reshape(draws, rows * columns))
    return patches[0] if count is None else patches


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _add_block(mask: torch.Tensor, remaining: int, min_block: int, max_block: int,
               log_aspect: tuple[float, float], generator: torch.Generator | None) -> int:
    """BEiT's ``_mask``: up to 10 attempts at one rectangle adding 1..``remaining`` new patches; the count added."""
    rows, columns = mask.shape
    for _ in range(10):
        area = _uniform(min_block, min(remaining, max_block), generator)
        aspect = math.exp(_uniform(*log_aspect, generator))
        height, width = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (0 < height < rows and 0 < width < columns):  # BEiT's strict bound: a block never spans the grid
            continue
        top = int(torch.randint(0, rows - height + 1, (), generator=generator))
        left = int(torch.randint(0, columns - width + 1, (), generator=generator))
        block = mask[top:top + height, left:left + width]
        new = int((~block).sum())
        if 0 < new <= remaining:
            block.fill_(True)
            return new
    return 0


def blockwise_mask(grid: tuple[int, int] | int, mask_ratio: float | tuple[float, float], mask_probability: float = 1.0,
                   min_block_patches: int = 4, max_block_patches: int | None = None,
                   aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None,
                   count: int | None = None) -> torch.Tensor:
    """Block-wise masking (BEiT, Bao et al. 2022, Algorithm 1) as iBOT (``ImageFolderMask``) and DINOv2
    (``MaskingGenerator``) draw it: a boolean mask, True = masked, for ``forward_vit``'s ``mask``.

    Per mask: with probability ``mask_probability`` a ratio r is drawn (``mask_ratio`` itself, or uniform in the
    range (low, high)) and the target is int(r * L) of the L patches; otherwise nothing is masked (iBOT's
    ``pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: half the crops unmasked, the others r ~ U(0.1, 0.5)). Rectangles
    are added until the target is met: each attempt draws an area uniform in [min_block_patches,
    min(remaining, max_block_patches)], an aspect ratio log-uniform in ``aspect_ratio``, h = round(sqrt(area *
    aspect)) and w = round(sqrt(area / aspect)) (both smaller than the grid), and a uniform position; a
    rectangle is kept when it masks between 1 and ``remaining`` new patches. After 10 failed attempts in a row
    the mask stops short of the target (BEiT's rule), so it never exceeds it.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        mask_ratio: r in [0, 1), or a range (low, high) with 0 <= low <= high < 1 drawn from per mask.
        mask_probability: the chance that a mask masks anything, in [0, 1] (iBOT and DINOv2: 0.5).
        min_block_patches: the smallest block area in patches (DINOv2: 4; iBOT: (min(rows, columns) // 3) ** 2).
        max_block_patches: the largest block area; None for no cap (iBOT); DINOv2 caps at half the grid.
        aspect_ratio: (low, high) of the block's height / width, 0 < low <= high (both papers: 0.3, 1 / 0.3).
        generator: the random source; None for torch's global one.
        count: None for one mask [L]; else ``count`` independent masks [count, L].
    Returns:
        bool [L] or [count, L], raster order.
    """
    rows, columns = _grid(grid)
    low, high = (float(mask_ratio), float(mask_ratio)) if isinstance(mask_ratio, (int, float)) else \
        (float(mask_ratio[0]), float(mask_ratio[1]))
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"mask_ratio must be r or (low, high) with 0 <= low <= high < 1, got {mask_ratio}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if min_block_patches < 1 or (max_block_patches is not None and max_block_patches < min_block_patches):
        raise ValueError(f"need 1 <= min_block_patches <= max_block_patches, got {min_block_patches} and "
                         f"{max_block_patches}")
    if not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"aspect_ratio must be (low, high) with 0 < low <= high, got {aspect_ratio}")
    log_aspect = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
    max_block = rows * columns if max_block_patches is None else max_block_patches
    draws = 1 if count is None else count
    masks = torch.zeros(draws, rows, columns, dtype=torch.bool)
    for mask in masks:
        if torch.rand((), generator=generator).item() >= mask_probability:
            continue
        target, masked = int(_uniform(low, high, generator) * rows * columns), 0
        while masked < target:
            added = _add_block(mask, target - masked, min_block_patches, max_block, log_aspect, generator)
            if added == 0:
                break
            masked += added
    masks = masks.reshape(draws, rows * columns)
    return masks[0] if count is None else masks


def _scale_range(value, name: str, upper: float = 1.0) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0.0 < low <= high <= upper:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= {upper:g}, got {tuple(value)}")
    return low, high


def multi_block_target_shapes(grid: tuple[int, int] | int, target_scale: tuple[float, float] = (0.15, 0.2),
                              target_aspect_ratio: tuple[float, float] = (0.75, 1.5)) -> list[tuple[int, int]]:
    """The (height, width) shapes of I-JEPA's target blocks here: all of one area T, so masks stack.

    The authors draw one block size per batch (scale and aspect ratio from the ranges) and every block of the batch
    takes it; here masks are drawn per sample in the data workers, so the size is fixed per run instead: the
    authors' size rule at the middle of both ranges, n = int(L * mean(target_scale)), a = mean(target_aspect_ratio),
    height = round(sqrt(n a)), width = round(sqrt(n / a)), T = height * width (8 x 8 grid: 4 x 3, T = 12, scale
    0.19). Each block's shape is drawn among every h x w rectangle of area T whose aspect ratio h / w lies in
    ``target_aspect_ratio`` (and which fits the grid), so both orientations occur (3 x 4 and 4 x 3); the middle
    block is always one of them.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        target_scale: (low, high) fraction of the patches in a block (paper 0.15-0.2).
        target_aspect_ratio: (low, high) of a block's height / width (paper 0.75-1.5).
    Returns:
        The shapes, by height; the first one's area is T.
    """
    rows, columns = _grid(grid)
    low, high = _scale_range(target_scale, "target_scale")
    aspect_low, aspect_high = _scale_range(target_aspect_ratio, "target_aspect_ratio", upper=math.inf)
    count = max(1, int(rows * columns * (low + high) / 2))
    aspect = (aspect_low + aspect_high) / 2
    height = min(rows, max(1, round(math.sqrt(count * aspect))))
    width = min(columns, max(1, round(math.sqrt(count / aspect))))
    area = height * width
    shapes = {(h, area // h) for h in range(1, rows + 1)
              if area % h == 0 and area // h <= columns and aspect_low <= h / (area // h) <= aspect_high}
    return sorted(shapes | {(height, width)})


def multi_block_context_count(grid: tuple[int, int] | int, context_ratio: float) -> int:
    """Patches in I-JEPA's context here: max(1, int(L * context_ratio)) of the L patches."""
    if not 0.0 < context_ratio < 1.0:
        raise ValueError(f"context_ratio must be in (0, 1), got {context_ratio}")
    rows, columns = _grid(grid)
    return max(1, int(rows * columns * context_ratio))


def multi_block_masks(grid: tuple[int, int] | int, num_targets: int = 4,
                      target_scale: tuple[float, float] = (0.15, 0.2),
                      target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
                      context_scale: tuple[float, float] = (0.85, 1.0), context_ratio: float = 0.25,
                      generator: torch.Generator | None = None,
                      max_tries: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's multi-block masking (Assran et al. 2023, sec. 3): ``num_targets`` target blocks and one context block
    with the target patches removed from it, as fixed-shape index tensors.

    Targets: ``num_targets`` blocks of ``multi_block_target_shapes`` (one area T; shape and position uniform, blocks
    may overlap one another, as in the paper). Context: one square block of side round(sqrt(L s)), s uniform in
    ``context_scale`` (aspect ratio 1, paper 0.85-1), at a uniform position; the patches of any target block are
    removed from it, and a uniformly random subset of exactly C = ``multi_block_context_count`` of the remaining
    patches is kept (the authors trim every context of a batch to the batch's smallest, keeping the first patches
    in raster order; a fixed C near that smallest size, drawn without the raster bias, replaces it). A draw
    leaving fewer than C context patches is redrawn (targets and context), as the authors redraw too-small masks.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        num_targets: M, the target blocks (paper 4).
        target_scale, target_aspect_ratio: see ``multi_block_target_shapes`` (paper 0.15-0.2 and 0.75-1.5).
        context_scale: (low, high) fraction of the patches in the context block before the targets are removed.
        context_ratio: C / L (default 0.25: on an 8 x 8 grid 16 patches, which about 96% of draws leave).
        generator: the random source; None for torch's global one.
        max_tries: draws before giving up with a ValueError (C too large for the targets).
    Returns:
        (context [C] int64 patch indices, ascending; targets [M, T] int64, each block in raster order).
    """
    rows, columns = _grid(grid)
    if num_targets < 1:
        raise ValueError(f"num_targets must be >= 1, got {num_targets}")
    shapes = multi_block_target_shapes((rows, columns), target_scale, target_aspect_ratio)
    context_low, context_high = _scale_range(context_scale, "context_scale")
    count = multi_block_context_count((rows, columns), context_ratio)
    for _ in range(max_tries):
        # One draw of uniforms per try, turned into integers in Python: a data worker makes this per sample, and
        # ~20 small torch calls per draw cost ten times as much.
        uniforms = torch.rand(3 * num_targets + 3, generator=generator).tolist()
        covered: set[int] = set()
        targets = []
        for block in range(num_targets):
            pick, down, right = uniforms[3 * block:3 * block + 3]
            height, width = shapes[int(pick * len(shapes))]
            top, left = int(down * (rows - height + 1)), int(right * (columns - width + 1))
            indices = [(top + i) * columns + left + j for i in range(height) for j in range(width)]
            covered.update(indices)
            targets.append(indices)
        scale, down, right = uniforms[-3:]
        side = min(rows, columns, max(1, round(math.sqrt(rows * columns * (context_low + (context_high - context_low)
                                                                            * scale)))))
        top, left = int(down * (rows - side + 1)), int(right * (columns - side + 1))
        available = [index for i in range(side) for j in range(side)
                     if (index := (top + i) * columns + left + j) not in covered]
        if len(available) >= count:
            chosen = torch.randperm(len(available), generator=generator)[:count].tolist()
            return torch.tensor(sorted(available[i] for i in chosen)), torch.tensor(targets)
    area = shapes[0][0] * shapes[0][1]
    raise ValueError(f"no context of {count} patches outside {num_targets} target blocks of {area} patches in "
                     f"{max_tries} draws on a {rows} x {columns} grid; lower context_ratio")


def inverse_block_keep(grid: tuple[int, int] | int, mask_ratio: float,
                       aspect_ratio: tuple[float, float] = (0.5, 2.0), roll: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """CAPI's inverse block masking (Darcet et al. 2025; the authors' ``InverseBlockMasking``): the VISIBLE patches
    are one block, every other patch is masked.

    With M = int(L * mask_ratio) masked, the K = L - M visible patches are the first K, in raster order, of an
    h x w block, h = ceil(sqrt(K a)), w = ceil(sqrt(K / a)), a log-uniform in ``aspect_ratio`` (narrowed so the
    block fits), at a uniform position; with ``roll`` the block is then shifted cyclically by a uniform offset in
    each direction (wrapping around the grid edges), as the authors' default does.

    Args:
        grid: (rows, columns) of the patch grid, or one int for a square grid.
        mask_ratio: fraction of the patches masked, in [0, 1) (paper 0.65).
        aspect_ratio: (low, high) of the block's height / width (authors 0.5-2).
        roll: shift the block cyclically (authors: True).
        generator: the random source; None for torch's global one.
    Returns:
        int64 [K] visible patch indices, ascending.
    """
    rows, columns = _grid(grid)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    aspect_low, aspect_high = _scale_range(aspect_ratio, "aspect_ratio", upper=math.inf)
    keep = rows * columns - int(rows * columns * mask_ratio)
    low = max(math.log(aspect_low), math.log(keep / columns ** 2))
    high = max(low, min(math.log(aspect_high), math.log(rows ** 2 / keep)))
    aspect = math.exp(low + (high - low) * torch.rand((), generator=generator).item())
    height = min(rows, math.ceil(math.sqrt(keep * aspect)))
    width = min(columns, max(math.ceil(math.sqrt(keep / aspect)), math.ceil(keep / height)))
    top = int(torch.randint(0, rows - height + 1, (), generator=generator))
    left = int(torch.randint(0, columns - width + 1, (), generator=generator))
    block = ((torch.arange(height) + top).view(-1, 1) * columns + torch.arange(width) + left).flatten()[:keep]
    if roll:
        down = int(torch.randint(0, rows, (), generator=generator))
        right = int(torch.randint(0, columns, (), generator=generator))
        block = (block // columns + down) % rows * columns + (block % columns + right) % columns
    return block.sort().values
