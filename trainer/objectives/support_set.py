"""The support set of nearest-neighbour objectives (NNCLR, NNBYOL, NNSiam, All4One): a FIFO queue of
L2-normalised projections and a cosine nearest-neighbour look-up into it (Dwibedi et al. 2021, sec. 3.1).

State, all registered buffers so checkpoints and ``--resume`` carry it: ``queue`` [size, D], ``pointer`` (the
next row to overwrite) and ``filled`` (rows written so far, at most ``size``). Rows are written from 0
upwards and wrap around once the queue is full, so the valid rows are always ``queue[:filled]``.

* ``nearest(z)`` / ``nearest_k(z, k)``: for each row of ``z`` the most similar queue row (or the k most
  similar, in decreasing order), by cosine similarity, returned without gradient. Pass the GLOBAL batch
  (``gather_no_grad``): the answer is then identical on every process.
* ``enqueue(z)``: write the GLOBAL batch (``gather_no_grad`` output, so every process holds the same queue)
  over the oldest rows; a batch longer than the queue keeps only its newest rows. ``stage(z)`` in ``forward``
  and ``flush()`` in ``after_step`` enqueue a training step's rows once its optimizer step is done (the
  look-ups of that step see the queue before it, as in the papers' code).

Before the queue holds k rows (at the first step), the candidates are the rows of ``z`` themselves: the
nearest neighbour of a row is then the row itself (its top-k: itself and its k - 1 closest batch-mates), so the
first step trains as the method's plain two-view counterpart (NNCLR: SimCLR's positive; NNSiam: SimSiam).
Similarities are computed in float32 with autocast off, so a mixed-precision run picks the same neighbours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SupportSet(nn.Module):
    """FIFO queue of ``size`` L2-normalised ``dim``-d rows with cosine nearest-neighbour look-up."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"support set needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._staged: torch.Tensor | None = None  # this step's rows, written by flush()

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def nearest_k(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` queue rows most cosine-similar to each row of ``z`` [N, D], most similar first: [N, k, D]
        (unit norm, in ``z``'s dtype, no gradient). While fewer than ``k`` rows are filled the candidates are
        the rows of ``z`` (normalised); ``z`` must then have at least ``k`` rows."""
        if z.dim() != 2 or z.shape[1] != self.queue.shape[1]:
            raise ValueError(f"support set of {self.queue.shape[1]}-d rows got queries of shape {tuple(z.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            query = F.normalize(z.detach().float(), dim=1)
            filled = int(self.filled)
            if filled >= k:
                candidates = self.queue[:filled].float()
            elif z.shape[0] >= k:
                candidates = query
            else:
                raise ValueError(f"support set holds {filled} rows and the batch {z.shape[0]}: fewer than k={k}")
            index = (query @ candidates.t()).topk(k, dim=1).indices  # [N, k], most similar first
        return candidates[index].to(z.dtype)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The queue row most cosine-similar to each row of ``z`` [N, D]: [N, D] (see ``nearest_k``)."""
        return self.nearest_k(z, 1)[:, 0]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """FIFO: write the rows of ``z`` [B, D] (the global batch), L2-normalised, over the oldest entries."""
        if z.dim() != 2 or z.shape[1] != self.queue.shape[1]:
            raise ValueError(f"support set of {self.queue.shape[1]}-d rows cannot hold rows of shape {tuple(z.shape)}")
        rows = F.normalize(z.detach()[-self.size:].to(self.queue.dtype), dim=1)
        index = (self.pointer + torch.arange(rows.shape[0], device=self.queue.device)) % self.size
        self.queue[index] = rows
        self.pointer.copy_((self.pointer + rows.shape[0]) % self.size)
        self.filled.copy_(torch.clamp(self.filled + rows.shape[0], max=self.size))

    @torch.no_grad()
    def stage(self, z: torch.Tensor) -> None:
        """Keep the global batch ``z`` [B, D] for ``flush()``; only the last staged batch of a step is kept."""
        self._staged = z.detach()

    @torch.no_grad()
    def flush(self) -> None:
        """Enqueue the staged rows, if any (call it from the objective's ``after_step``)."""
        staged, self._staged = self._staged, None
        if staged is not None:
            self.enqueue(staged)
