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
"""
from __future__ import annotations

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
